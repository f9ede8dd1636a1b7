"""Where the wall time of `axolotl train` goes: an Axolotl plugin that writes timestamped events.

    plugins:
      - bench.timeline.TimelinePlugin      # with BENCH_TIMELINE_JSONL=/path/timeline.jsonl

Each event is one JSON line `{"event": ..., "t": unix seconds, ...}` from the training process
(rank 0): its own start (`process_start`), the config loaded (`register`, the first moment our
code runs), model load (`pre_model_load`, `post_model_load`), the Trainer built, training begin
and end, the end of every optimizer step, the begin and end of every evaluation and checkpoint,
and the two `post_train` calls (after the loop, after the final save). `breakdown()` turns them,
with the launcher's own start and end times, into the parts of the time to adapter
(bench/time_to_adapter.py).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

ENV_TIMELINE = "BENCH_TIMELINE_JSONL"
# BENCH_PROFILE_LOAD=1: cProfile from pre_model_load to post_model_load, the top functions by
# cumulative time written next to the timeline (<timeline>.load-profile.txt)
ENV_PROFILE_LOAD = "BENCH_PROFILE_LOAD"

try:  # the plugin base class only exists where axolotl is installed
    from axolotl.integrations.base import BasePlugin
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    BasePlugin = TrainerCallback = object


def process_start_time() -> float:
    """This process's start as unix time (from /proc, else now)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: no start event
        return time.time()


class Timeline:
    """Appends events to the file named by BENCH_TIMELINE_JSONL (rank 0 only; none if unset)."""

    def __init__(self):
        path = os.environ.get(ENV_TIMELINE)
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        self.path = Path(path) if path and rank == 0 else None

    def event(self, name: str, t: float | None = None, **fields):
        if self.path is None:
            return
        if name != "process_start":  # the GPU's queued work belongs to what came before
            _synchronize()
        record = {"event": name, "t": time.time() if t is None else t, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _synchronize():
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - timing must never break a run
        pass


def timed(timeline: Timeline, name: str, method):
    """`method` wrapped with `<name>_begin` / `<name>_end` events."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        timeline.event(f"{name}_begin")
        try:
            return method(*args, **kwargs)
        finally:
            timeline.event(f"{name}_end")

    return wrapper


class StepEvents(TrainerCallback):
    def __init__(self, timeline: Timeline):
        self.timeline = timeline

    def on_train_begin(self, args, state, control, **kwargs):
        self.timeline.event("train_begin", step=state.global_step, max_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.timeline.event("step_end", step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.timeline.event("train_end", step=state.global_step)


class TimelinePlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self.timeline = Timeline()
        self.post_train_calls = 0

    def register(self, cfg):
        self.timeline.event("process_start", t=process_start_time(), pid=os.getpid())
        self.timeline.event("register")

    def pre_model_load(self, cfg):
        self.timeline.event("pre_model_load")
        if os.environ.get(ENV_PROFILE_LOAD) == "1" and self.timeline.path is not None:
            import cProfile

            self.profile = cProfile.Profile()
            self.profile.enable()

    def post_model_load(self, cfg, model):
        profile = getattr(self, "profile", None)
        if profile is not None:
            import io
            import pstats

            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
            self.timeline.path.with_suffix(".load-profile.txt").write_text(text.getvalue())
            self.profile = None
        self.timeline.event("post_model_load")

    def post_trainer_create(self, cfg, trainer):
        trainer.evaluate = timed(self.timeline, "evaluate", trainer.evaluate)
        trainer._save_checkpoint = timed(self.timeline, "checkpoint", trainer._save_checkpoint)
        trainer.add_callback(StepEvents(self.timeline))
        self.timeline.event("trainer_created")

    def post_train(self, cfg, model):
        self.post_train_calls += 1
        self.timeline.event("post_train", call=self.post_train_calls)


# ----------------------------------------------------------------------------------------------
# The breakdown


def _spans(events: list[dict], name: str) -> list[float]:
    begins = [e["t"] for e in events if e["event"] == f"{name}_begin"]
    ends = [e["t"] for e in events if e["event"] == f"{name}_end"]
    return [end - begin for begin, end in zip(begins, ends, strict=False)]


def _first(events: list[dict], name: str) -> float | None:
    return next((e["t"] for e in events if e["event"] == name), None)


def _last(events: list[dict], name: str) -> float | None:
    return next((e["t"] for e in reversed(events) if e["event"] == name), None)


def _within(events: list[dict], name: str, start: float, end: float) -> float:
    """Seconds of `name` spans that began in [start, end)."""
    begins = [e["t"] for e in events if e["event"] == f"{name}_begin"]
    return sum(span for begin, span in zip(begins, _spans(events, name), strict=False)
               if start <= begin < end)


def breakdown(events: list[dict], launched: float, finished: float) -> dict:
    """The parts of `finished - launched` (the launcher's clock around `axolotl train`)."""
    t = {name: _first(events, name) for name in
         ("process_start", "register", "pre_model_load", "post_model_load", "trainer_created",
          "train_begin", "train_end")}
    if any(value is None for value in t.values()):
        missing = [name for name, value in t.items() if value is None]
        return {"time_to_adapter_s": finished - launched, "incomplete": missing}
    steps = [e["t"] for e in events if e["event"] == "step_end"]
    evals, saves = _spans(events, "evaluate"), _spans(events, "checkpoint")
    first_step_end = steps[0] if steps else t["train_end"]
    first_window = (first_step_end - t["train_begin"]
                    - _within(events, "evaluate", t["train_begin"], first_step_end)
                    - _within(events, "checkpoint", t["train_begin"], first_step_end))
    loop = t["train_end"] - t["train_begin"]
    final = _last(events, "post_train")
    parts = {
        "launchers_s": t["process_start"] - launched,
        "imports_and_config_s": t["register"] - t["process_start"],
        "data_s": t["pre_model_load"] - t["register"],
        "model_load_s": t["post_model_load"] - t["pre_model_load"],
        "trainer_setup_s": t["train_begin"] - t["post_model_load"],
        "first_step_s": first_window,
        "later_steps_s": loop - first_window - sum(evals) - sum(saves),
        "evaluations_s": sum(evals),
        "checkpoints_s": sum(saves),
        "final_save_s": (final or t["train_end"]) - t["train_end"],
        "exit_s": finished - (final or t["train_end"]),
    }
    return {
        "time_to_adapter_s": finished - launched,
        "parts": parts,
        "steps": len(steps),
        "evaluations": len(evals),
        "evaluation_s_each": evals,
        "checkpoints": len(saves),
        "checkpoint_s_each": saves,
        "train_loop_s": loop,
    }
