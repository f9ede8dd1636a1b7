"""Per-optimizer-step measurements inside a transformers Trainer (axolotl's or a plain one).

`StepRecorder.attach(trainer)` wraps `trainer.training_step` (called once per micro-batch) to
count real tokens and attended pairs of each micro-batch and sum its loss, and adds a callback
that, at each optimizer step's end, synchronises the GPU and writes one JSON line:

    {"event": "step", "step": 3, "step_s": 1.31, "compute_s": 1.30, "tokens": 8155,
     "attn_pairs": ..., "loss": 10.4, "model_flops": ..., "hardware_flops": ...,
     "peak_alloc_gib": ..., "peak_reserved_gib": ..., "unix_time": ...}

`step_s` is the wall time between the ends of consecutive optimizer steps (so data loading,
the optimizer and logging are in it; step 1 is timed from its own begin); `compute_s` runs from
`on_step_begin` to `on_step_end`. Peak memory is per step (the counters are reset after each
record); the `meta` line written at train begin holds the peak of model loading. Every rank of
a multi-GPU run writes its own file (`<path>.rank<r>.jsonl`); bench.train_throughput sums
tokens over ranks and takes the slowest rank's time.

Diagnostics of one step, each next to the step records: BENCH_PROFILE_STEP=N writes the torch
profile of optimizer step N (`.profile.txt`); with BENCH_PROFILE_TRACE=1 also its trace
(`.trace.json.gz`, Python stacks included) and where the GPU sat idle in it (bench/gpu_gaps.py,
appended to the profile). BENCH_SYNC_STEP=N lists every operation from step N's begin to the next
step's that made the host wait for the GPU (torch's sync debug mode), with the Python frames
that called it (`.syncs.txt`).
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.common import rank_path
from bench.flops import DecoderShape, step_flops

GIB = 2**30


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def batch_token_stats(inputs, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(real tokens, attended causal pairs) of one collated micro-batch, as device tensors.

    Documents are found from `attention_mask` (0 = padding; axolotl's packing collator numbers
    the documents of a row 1, 2, ...), else from `position_ids` resets (axolotl drops the mask
    for sdpa packing; a segment whose labels are all -100 is then the padding tail), else each
    row is one document.
    """
    input_ids = inputs["input_ids"]
    rows, length = input_ids.shape[0], input_ids.shape[-1]
    row_index = torch.arange(rows, device=input_ids.device).unsqueeze(1)
    mask = inputs.get("attention_mask")
    position_ids = inputs.get("position_ids")
    labels = inputs.get("labels")
    if mask is not None and mask.dim() == 2:
        mask = mask.long()
        segment = row_index * (int(mask.max()) + 1) + mask
        valid = mask > 0
    elif position_ids is not None:
        position_ids = position_ids.reshape(rows, -1)
        segment = row_index * (length + 1) + torch.cumsum(position_ids == 0, dim=1)
        valid = torch.ones_like(segment, dtype=torch.bool)
        if labels is not None:
            labelled = torch.bincount(segment.flatten(), weights=(labels != -100).flatten().float())
            valid = labelled[segment] > 0
    else:
        segment = row_index.expand(rows, length)
        valid = torch.ones_like(segment, dtype=torch.bool)
    counts = torch.bincount(segment[valid])
    counts = counts[counts > 0].double()
    if window is None:
        pairs = counts * (counts + 1) / 2
    else:
        pairs = torch.where(counts <= window, counts * (counts + 1) / 2,
                            window * (window + 1) / 2 + (counts - window) * window)
    return counts.sum(), pairs.sum()


def lora_param_count(model) -> int:
    """Trainable parameters (LoRA A/B and anything else left trainable)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class StepRecorder(TrainerCallback):
    """Writes one JSON line per optimizer step; see the module docstring."""

    def __init__(self, out_path: str | Path, shape: DecoderShape, gradient_checkpointing: bool,
                 label: str = ""):
        self.rank, self.world_size = rank_and_world()
        self.out_path = rank_path(out_path, self.rank)
        self.shape = shape
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.label = label
        self.cuda = torch.cuda.is_available()
        self.trainable_params = 0
        self._reset_accumulators()
        self._step_begin = None
        self._last_end = None
        # BENCH_PROFILE_STEP=N: run torch.profiler over optimizer step N and write the top ops
        # (GPU self time, then CPU total) next to the step records.
        self.profile_step = int(os.environ.get("BENCH_PROFILE_STEP", "0") or 0)
        self.trace = os.environ.get("BENCH_PROFILE_TRACE", "0") == "1"
        self._profiler = None
        self.sync_step = int(os.environ.get("BENCH_SYNC_STEP", "0") or 0)
        self._syncs: Counter | None = None
        self._warnings = None

    # -- plumbing -------------------------------------------------------------------------
    def attach(self, trainer) -> StepRecorder:
        inner = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            tokens, pairs = batch_token_stats(inputs, self.shape.sliding_window)
            loss = inner(model, inputs, *args, **kwargs)
            self._tokens += tokens
            self._pairs += pairs
            self._loss += loss.detach().double()
            return loss

        trainer.training_step = training_step
        trainer.add_callback(self)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text("")
        return self

    def _reset_accumulators(self):
        self._tokens = 0
        self._pairs = 0
        self._loss = 0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def write(self, record: dict):
        record.update(rank=self.rank, unix_time=time.time(), label=self.label)
        with self.out_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _memory(self) -> dict:
        if not self.cuda:
            return {"peak_alloc_gib": None, "peak_reserved_gib": None}
        stats = {"peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
                 "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        torch.cuda.reset_peak_memory_stats()
        return stats

    # -- callback events ------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._sync()
        self.trainable_params = lora_param_count(model) if model is not None else 0
        total = sum(p.numel() for p in model.parameters()) if model is not None else 0
        self.write({
            "event": "meta",
            "shape": self.shape.as_dict(),
            "dense_linear_params": self.shape.linear_params,
            "trainable_params": self.trainable_params,
            "stored_params": total,
            "gradient_checkpointing": self.gradient_checkpointing,
            "world_size": self.world_size,
            "micro_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_steps": args.max_steps,
            "device": torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu",
            "torch": torch.__version__,
            "load": self._memory(),
        })

    def on_step_begin(self, args, state, control, **kwargs):
        if self._syncs is not None:  # the previous step's logging and this step's batch included
            self._write_sync_log()
        self._sync()
        if self.profile_step and state.global_step + 1 == self.profile_step and self.rank == 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, with_stack=self.trace)
            self._profiler.__enter__()
        if self.sync_step and state.global_step + 1 == self.sync_step and self.rank == 0:
            self._start_sync_log()
        self._step_begin = time.perf_counter()

    def _start_sync_log(self):
        """Until the next step begins (so the logging after this step and the next batch are
        in it), every implicit GPU synchronisation is counted by call site; this recorder's own
        reads of the step's token counts among them (step_recorder.py frames)."""
        self._syncs = Counter()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        record = self._syncs

        def show(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
            where = " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                               for f in reversed(frames[-6:]))
            record[f"{str(message).splitlines()[0][:80]} | {where}"] += 1

        warnings.showwarning = show
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")

    def _write_sync_log(self):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(None, None, None)
        lines = [f"# {self.label}: host waits for the GPU during optimizer step {self.sync_step}: "
                 f"{sum(self._syncs.values())}"]
        lines += [f"{count:4d}  {where}" for where, count in self._syncs.most_common()]
        self.out_path.with_suffix(".syncs.txt").write_text("\n".join(lines) + "\n")
        self._syncs = self._warnings = None

    def _write_profile(self, step_s: float):
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages()
        # the kernels of one stream do not overlap: their summed self time is the GPU's busy time.
        # Only the kernels' own rows, as torch's table totals them: an op's row repeats the
        # device time of the kernels it launched
        gpu_key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        from torch.autograd import DeviceType

        rows = [e for e in averages if not getattr(e, "is_user_annotation", False)
                and (not self.cuda or e.device_type == DeviceType.CUDA)]
        gpu_total_us = sum(getattr(e, gpu_key, 0) or 0 for e in rows)
        tables = [f"# {self.label}: optimizer step {self.profile_step}; summed GPU self time "
                  f"{gpu_total_us / 1e3:.1f} ms of the step's {step_s * 1e3:.1f} ms (profiled)",
                  averages.table(sort_by=gpu_key, row_limit=30),
                  averages.table(sort_by="cpu_time_total", row_limit=20)]
        if self.trace:
            from bench.gpu_gaps import find_gaps, load_trace, summary

            trace_path = self.out_path.with_suffix(".trace.json.gz")
            profiler.export_chrome_trace(str(trace_path))
            tables.append("# where the GPU sat idle (bench/gpu_gaps.py)\n"
                          + summary(*find_gaps(load_trace(trace_path))))
        with self.out_path.with_suffix(".profile.txt").open("w") as handle:
            handle.write("\n\n".join(tables) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        tokens = int(self._tokens)
        pairs = int(self._pairs)
        model_flops, hardware_flops = step_flops(
            self.shape, tokens, pairs, self.trainable_params, self.gradient_checkpointing)
        record = {
            "event": "step",
            "step": state.global_step,
            "step_s": now - (self._last_end if self._last_end is not None else self._step_begin),
            "compute_s": now - self._step_begin,
            "tokens": tokens,
            "attn_pairs": pairs,
            "loss": float(self._loss),
            "model_flops": model_flops,
            "hardware_flops": hardware_flops,
        }
        record.update(self._memory())
        self.write(record)
        if self._profiler is not None:
            self._write_profile(record["compute_s"])
            now = time.perf_counter()  # profiler teardown stays out of the next step's time
        self._last_end = now
        self._reset_accumulators()

    def on_train_end(self, args, state, control, **kwargs):
        if self._syncs is not None:  # step N was the last
            self._write_sync_log()
        self.write({"event": "end", "global_step": state.global_step})
