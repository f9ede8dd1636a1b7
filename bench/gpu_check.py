"""One check of the whole GPU path on the machine it runs on, with one JSON + Markdown summary.

Usage:
    make gpu-check                                     # = python -m bench.gpu_check
    python -m bench.gpu_check [--recipe recipes/mistral-qlora.yml] [--model auto|DIR|HUB_ID]
        [--out DIR | --out-root bench/results] [--work outputs/gpu-check] [--skip STAGE,...]
        [--set KEY=YAML ...] [--launcher auto|axolotl|python] [--deadline-s SECONDS]
        [--prep-args "..."] [--eval-args "..."] [--pytest-args "-m gpu"]

What a user does after cloning, each stage a real subprocess running the user's own command,
timed, with its peak GPU memory and its key figure:

  data_prep          python -m data_prep --mode clean
  model              the base model: --model DIR/HUB_ID; else the recipe's base_model when it is
                     a local directory; else mistralai/Mistral-7B-v0.1 when HF_TOKEN is set and
                     the hub grants access (downloaded once); else a random-init model of its
                     exact shape (python -m bench.build_random_mistral; compute and memory do not
                     depend on the weight values). The summary says which. A given model that
                     is not pretrained (every norm weight still 1.0, as transformers initialises
                     them) is trained as the built one is: without the recipe's loss watchdog.
  train_interrupted  axolotl train RECIPE, stopped with SIGTERM (to its process group, like
                     Ctrl-C or a scheduler's kill) as soon as its first checkpoint is complete
  train_resumed      the same command again: it must resume from that checkpoint and finish
  train_reference    the same recipe uninterrupted, for comparison (on a second GPU when there
                     is one, else beside the others on the same GPU); the summary reports the
                     adapter's and the losses' differences between resumed and uninterrupted
  evaluate           python -m eval RECIPE: perplexity + generations + report, one model load
  merge              axolotl merge-lora RECIPE
  merged_logits      the merged model's logits and loss vs base + adapter on held-out text
  pytest             python -m pytest -m gpu, on the test files that hold GPU tests

The recipe is used as it is, except `base_model` (the model above), `output_dir` and
`dataset_prepared_path` (under --work, so nothing of yours in outputs/ is touched) and --set.
Training runs through `axolotl train` (or `python -m axolotl.cli.train` where the `accelerate`
launcher is not installed as a command, e.g. packages installed with pip --target).

Outputs: OUT/summary.json, OUT/summary.md, OUT/logs.txt (the end of every stage's log), and the
run's perplexity.md and generations.md; OUT = --out, else OUT_ROOT/<date>-<gpu>/
(OUT_ROOT = bench/results). Exit status 0 when every stage that ran is ok. A stage that
failed or ended early says why, from its log: the loss watchdog, the NaN/inf stop, out of GPU
memory, a full disk, or killed by a signal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.timeline import ENV_TIMELINE, breakdown
from core.errors import EXIT_FAILED, EXIT_OK, cli, first_line
from core.files import read_jsonl, write_file, write_files
from core.runs import (
    HELD_OUT_CORPUS_PPL,
    Run,
    checkpoint_complete,
    checkpoints,
    load_recipe,
    newest_trainer_state,
    parse_overrides,
    read_trainer_state,
    write_recipe,
)

REPO = Path(__file__).resolve().parent.parent
TIMELINE_PLUGIN = "bench.timeline.TimelinePlugin"
DEFAULT_RECIPE = Path("recipes/mistral-qlora.yml")
DEFAULT_WORK = Path("outputs/gpu-check")
DEFAULT_OUT_ROOT = Path("bench/results")
DEFAULT_RANDOM_MODEL = Path("models/mistral-7b-random")
HUB_MODEL = "mistralai/Mistral-7B-v0.1"
STAGES = ("data_prep", "model", "train_interrupted", "train_resumed", "train_reference",
          "evaluate", "merge", "merged_logits", "pytest")
TITLES = {
    "data_prep": "data prep",
    "model": "base model",
    "train_interrupted": "train, killed after 1st checkpoint",
    "train_resumed": "train again: resume",
    "train_reference": "train uninterrupted (reference)",
    "evaluate": "evaluate (perplexity + generate + report)",
    "merge": "merge-lora",
    "merged_logits": "merged model vs base + adapter",
    "pytest": "pytest",
}
POLL_S = 0.5
KILL_GRACE_S = 60
LOG_TAIL_LINES = 60
# Goals of the evaluation on one H100/H200 with the 4-bit 7B (shown next to the measurements).
GOAL_GENERATE_S = 20
GOAL_EVALUATE_S = 90
# The merged checkpoint stores base + scale * B @ A rounded to its dtype (bf16 on a GPU). The
# merge is right when every weight is that sum up to the rounding (the allowance covers fp32
# summation order), and the merged model keeps the adapter's gain in held-out loss. Logit and
# top-1 differences are reported, not judged: when the LoRA change is small next to the weight
# (a short run), bf16 storage rounds part of it away and the logits move with it.
MERGED_ROUNDING_ALLOWANCE = 1.05  # mean |merged - (base + delta)| <= this x the rounding's own
MERGED_GAIN_KEPT_MIN = 0.95  # (base loss - merged loss) / (base loss - adapter loss)
MERGED_NLL_TOLERANCE = 0.01  # without a gain to keep: relative held-out loss difference


def now() -> float:
    return time.monotonic()


_SAY = threading.Lock()


def say(line: str) -> None:
    """One progress line (the stages run in threads: one write each, never interleaved)."""
    with _SAY:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


@dataclass
class Stage:
    name: str
    title: str
    status: str = "pending"  # ok, failed, skipped, timeout
    command: str | None = None
    rc: int | None = None
    start_s: float | None = None  # since the check started
    wall_s: float | None = None
    gpu: str | None = None
    peak_gpu_mib: int | None = None  # this stage's processes (nvidia-smi per-process memory)
    gpu_used_peak_mib: int | None = None  # the whole GPU while it ran (other stages included)
    key: dict = field(default_factory=dict)
    note: str = ""
    log: str | None = None


# --------------------------------------------------------------------------- GPU memory


def nvidia_smi(*query: str) -> list[list[str]]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines()
            if line.strip()]


def gpu_inventory() -> list[dict]:
    rows = nvidia_smi("--query-gpu=index,name,memory.total,driver_version")
    return [{"index": r[0], "name": r[1], "memory_mib": int(float(r[2])), "driver": r[3]}
            for r in rows if len(r) >= 4]


def process_children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def descendants(root: int, children: dict[int, list[int]]) -> set[int]:
    """`root` and every process below it."""
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


class GpuMonitor:
    """Polls nvidia-smi; the peak memory of each running stage's processes and of its GPU."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.running: dict[str, tuple[Stage, int]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def track(self, stage: Stage, pid: int):
        with self.lock:
            self.running[stage.name] = (stage, pid)

    def untrack(self, stage: Stage):
        with self.lock:
            self.running.pop(stage.name, None)
        self.sample()  # one last look is not possible after exit; keep what was seen

    def sample(self):
        if not self.enabled:
            return
        used = {r[0]: int(float(r[1])) for r in nvidia_smi("--query-gpu=index,memory.used")
                if len(r) >= 2}
        apps = nvidia_smi("--query-compute-apps=pid,used_memory")
        with self.lock:
            running = list(self.running.values())
        children = process_children() if apps else {}
        for stage, pid in running:
            pids = descendants(pid, children)
            mine = sum(int(float(a[1])) for a in apps
                       if len(a) >= 2 and a[0].isdigit() and int(a[0]) in pids)
            if mine:
                stage.peak_gpu_mib = max(stage.peak_gpu_mib or 0, mine)
            for gpu in (stage.gpu or "").split(","):
                if gpu in used:
                    stage.gpu_used_peak_mib = max(stage.gpu_used_peak_mib or 0, used[gpu])

    def _loop(self):
        while not self.stop.wait(POLL_S):
            with contextlib.suppress(Exception):
                self.sample()


# --------------------------------------------------------------------------- the run


class Check:
    def __init__(self, args):
        self.args = args
        self.t0 = now()
        self.deadline = self.t0 + args.deadline_s if args.deadline_s else None
        self.work = (REPO / args.work).resolve() if not args.work.is_absolute() else args.work
        self.logs = self.work / "logs"
        self.stages = {name: Stage(name, TITLES[name]) for name in STAGES}
        self.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        self.gpus = gpu_inventory()
        self.monitor = GpuMonitor(enabled=bool(self.gpus))
        self.done = {name: threading.Event() for name in STAGES}
        self.model_ref: str | None = None
        self.model_kind: str | None = None
        self.model_untrained: str | None = None  # why a given model is taken for random-init
        self.recipe_cfg = load_recipe(REPO / args.recipe)
        self.overrides = parse_overrides(args.set)
        self.lane_a = self.gpus[0]["index"] if self.gpus else None
        self.lane_b = self.gpus[1]["index"] if len(self.gpus) > 1 else self.lane_a
        self.env_base = self._env()

    # -- helpers

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(AXOLOTL_DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", NCCL_NVLS_ENABLE="0",
                   TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
        return env

    def env_for(self, gpu: str | None) -> dict:
        env = dict(self.env_base)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def elapsed(self) -> float:
        return now() - self.t0

    def axolotl(self, verb: str, recipe: Path) -> list[str]:
        module = {"train": "axolotl.cli.train", "merge-lora": "axolotl.cli.merge_lora"}[verb]
        launcher = self.args.launcher
        exe_dir = Path(sys.executable).parent
        axolotl = exe_dir / "axolotl" if (exe_dir / "axolotl").exists() else shutil.which(
            "axolotl")
        accelerate = (exe_dir / "accelerate").exists() or shutil.which("accelerate")
        if launcher == "auto":
            launcher = "axolotl" if axolotl and accelerate else "python"
        if launcher == "axolotl":
            return [str(axolotl or "axolotl"), verb, str(recipe)]
        return [sys.executable, "-m", module, str(recipe)]

    def write_recipe(self, name: str, timed: bool = False) -> Path:
        overrides = {**self.overrides, "base_model": self.model_ref,
                     "output_dir": str(self.work / name),
                     "dataset_prepared_path": str(self.work / f"prepared-{name}")}
        if self.model_kind == "random-init" or self.model_untrained:
            # a random-init model's loss starts near ln(32000) = 10.4, above the watchdog
            # threshold the recipe sets for real weights, which would stop it after 3 steps
            overrides.update(loss_watchdog_threshold=None, loss_watchdog_patience=None)
        if timed:  # bench.timeline's plugin: the time to adapter, part by part
            plugins = overrides.get("plugins", self.recipe_cfg.get("plugins")) or []
            overrides["plugins"] = [*plugins, TIMELINE_PLUGIN]
        return write_recipe(self.recipe_cfg, self.work / "recipes" / f"{name}.yml", overrides)

    def blocked(self, stage: Stage, *needs: str) -> bool:
        """Mark `stage` skipped when it is skipped by the user, a stage it needs is not ok, or
        the deadline has passed; True when it must not run."""
        if stage.name in self.skip:
            stage.status, stage.note = "skipped", "--skip"
        elif bad := [n for n in needs if self.stages[n].status != "ok"]:
            stage.status = "skipped"
            stage.note = f"needs {', '.join(bad)} ({self.stages[bad[0]].status})"
        elif self.deadline and now() >= self.deadline:
            stage.status, stage.note = "skipped", "deadline reached"
        else:
            return False
        return True

    def run(self, stage: Stage, cmd: list[str], gpu: str | None, watch=None,
            env: dict | None = None) -> int | None:
        """Run `cmd` as the stage's process (own process group), logging to logs/NAME.log;
        `watch()` returning True stops it with SIGTERM (status stays for the caller)."""
        stage.command = shlex.join(cmd)
        stage.gpu = gpu
        stage.log = str(self.logs / f"{stage.name}.log")
        stage.start_s = round(self.elapsed(), 1)
        say(f"[gpu-check +{stage.start_s:.0f}s] {stage.name}: {stage.command}"
            + (f"  (GPU {gpu})" if gpu is not None else ""))
        start = now()
        with open(stage.log, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env_for(gpu), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.monitor.track(stage, proc.pid)
            try:
                while proc.poll() is None:
                    if watch is not None and watch():
                        stage.rc = stop_group(proc, signal.SIGTERM)
                        break
                    if self.deadline and now() >= self.deadline:
                        stop_group(proc, signal.SIGTERM)
                        stage.status, stage.note = "timeout", "killed at the deadline"
                        break
                    time.sleep(POLL_S)
                else:
                    stage.rc = proc.returncode
            finally:
                if proc.poll() is None:
                    stop_group(proc, signal.SIGKILL)
                self.monitor.untrack(stage)
        stage.wall_s = round(now() - start, 1)
        if stage.status == "pending":
            stage.status = "ok" if stage.rc == 0 else "failed"
        if stage.status == "failed" and not stage.note:
            why = early_end_reason(Path(stage.log), stage.rc)
            stage.note = (f"exit {stage.rc}" + (f", {why}" if why else "")
                          + f": {last_error_line(Path(stage.log))}")
        return stage.rc

    def complete(self, name: str):
        """The stage's final status is known: print it and let waiting stages go on."""
        stage = self.stages[name]
        wall = f" in {stage.wall_s:.0f} s" if stage.wall_s is not None else ""
        note = f" ({stage.note})" if stage.note else ""
        say(f"[gpu-check +{self.elapsed():.0f}s] {name}: {stage.status}{wall}{note}")
        self.done[name].set()

    # -- stages

    def data_prep(self):
        stage = self.stages["data_prep"]
        if not self.blocked(stage):
            cmd = [sys.executable, "-m", "data_prep", "--mode", "clean",
                   *shlex.split(self.args.prep_args)]
            self.run(stage, cmd, None)
            stats = REPO / "data" / "prepared" / "clean" / "stats.json"
            if stage.status == "ok" and stats.is_file():
                stage.key = prep_figures(json.loads(stats.read_text()))
        self.complete("data_prep")

    def model(self):
        stage = self.stages["model"]
        if self.blocked(stage):
            return self.complete(stage.name)
        ref, kind, note = self.choose_model()
        stage.note = note
        if kind == "random-init":
            out = Path(self.args.random_model_dir)
            cmd = [sys.executable, "-m", "bench.build_random_mistral", "--out", str(out)]
            if self.args.tokenizer_from:
                cmd += ["--tokenizer-from", str(self.args.tokenizer_from)]
            if not self.gpus:
                cmd += ["--tiny", "--device", "cpu", "--dtype", "float32"]
            self.run(stage, cmd, self.lane_a)
            ref = str((REPO / out).resolve())
        elif kind == "hub":
            code = ("import sys; from huggingface_hub import snapshot_download; "
                    "print(snapshot_download(sys.argv[1], allow_patterns=['*.json', "
                    "'*.safetensors', 'tokenizer.model']))")
            self.run(stage, [sys.executable, "-c", code, ref], None)
        else:
            stage.status, stage.wall_s, stage.start_s = "ok", 0.0, round(self.elapsed(), 1)
            self.model_untrained = untrained_reason(Path(ref))
            if self.model_untrained:
                stage.note += (f"; not pretrained ({self.model_untrained}): trained without the "
                               "recipe's loss watchdog, as a random-init model is")
        self.model_ref, self.model_kind = ref, kind
        stage.key = {"model": ref, "kind": kind}
        if self.model_untrained:
            stage.key["not_pretrained"] = self.model_untrained
        self.complete("model")

    def choose_model(self) -> tuple[str, str, str]:
        """(reference, kind, note): kind is 'given', 'hub' or 'random-init'."""
        if self.args.model != "auto":
            path = Path(self.args.model)
            local = (REPO / path) if not path.is_absolute() else path
            if local.is_dir():
                return str(local.resolve()), "given", f"--model {self.args.model}"
            return self.args.model, "hub", f"--model {self.args.model}"
        base = str(self.recipe_cfg.get("base_model", ""))
        if base and (REPO / base).is_dir():
            return str((REPO / base).resolve()), "given", "the recipe's local base_model"
        token = os.environ.get("HF_TOKEN")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if not token:
            return "", "random-init", ("no HF_TOKEN: a random-init model of Mistral-7B-v0.1's "
                                       "exact shape")
        if offline:
            return "", "random-init", ("HF_TOKEN is set but HF_HUB_OFFLINE=1: a random-init "
                                       "model of Mistral-7B-v0.1's exact shape")
        try:
            from huggingface_hub import auth_check

            auth_check(HUB_MODEL)
        except Exception as err:  # noqa: BLE001 - any hub failure: say why, use the random one
            from eval.errors import hub_problem

            reason = hub_problem(err, HUB_MODEL) or first_line(err, 200)
            return "", "random-init", f"HF_TOKEN is set but the hub refused: {reason}"
        return HUB_MODEL, "hub", f"{HUB_MODEL} from the Hugging Face hub (HF_TOKEN)"

    def train_interrupted(self, recipe: Path):
        stage = self.stages["train_interrupted"]
        if self.blocked(stage, "data_prep", "model"):
            return self.complete(stage.name)
        out = Run.from_recipe(recipe).output_dir
        found: dict = {}

        def first_checkpoint() -> bool:
            complete = next((c for c in checkpoints(out) if checkpoint_complete(c)), None)
            if complete is None:
                return False
            step = read_trainer_state(complete / "trainer_state.json")["global_step"]
            found.update(checkpoint=complete, step=step, at_s=self.elapsed())
            return True

        self.run(stage, self.axolotl("train", recipe), self.lane_a, watch=first_checkpoint)
        if found and stage.status != "timeout":
            stage.key = {"checkpoint": found["checkpoint"].name, "step": found["step"],
                         "killed_at_s": round(found["at_s"] - stage.start_s, 1),
                         "exit": stage.rc, "signal": "SIGTERM"}
            if stage.rc == 0:  # it finished before the signal landed: nothing to resume
                stage.status, stage.note = "failed", "finished before it could be stopped"
            else:  # stopped by our SIGTERM (-15, or accelerate's exit status for it)
                stage.status, stage.note = "ok", ""
        elif stage.status == "ok":
            why = early_end_reason(Path(stage.log), stage.rc)
            stage.status, stage.note = "failed", "finished without writing any checkpoint" + (
                f" ({why})" if why else "")
        self.complete("train_interrupted")

    def train_resumed(self, recipe: Path):
        stage = self.stages["train_resumed"]
        if self.blocked(stage, "train_interrupted"):
            return self.complete(stage.name)
        self.run(stage, self.axolotl("train", recipe), self.lane_a)
        checkpoint = self.stages["train_interrupted"].key.get("checkpoint")
        out = Run.from_recipe(recipe).output_dir
        log = Path(stage.log).read_text(errors="replace")
        resumed = re.search(r"resume from checkpoint at (\S*checkpoint-(\d+))", log)
        stage.key = train_figures(out)
        stage.key["resumed_from_step"] = int(resumed[2]) if resumed else None
        if stage.status == "ok":
            problems = []
            if not resumed or not resumed[1].endswith(checkpoint):
                problems.append(f"no 'resume from checkpoint at …/{checkpoint}' in its log")
            state = stage.key
            if state.get("global_step") != state.get("max_steps"):
                why = early_end_reason(Path(stage.log), stage.rc)
                problems.append(f"stopped at step {state.get('global_step')} of "
                                f"{state.get('max_steps')}" + (f" ({why})" if why else ""))
            if state.get("steps_logged_twice"):
                problems.append(f"steps logged twice: {state['steps_logged_twice']}")
            if not Run.from_recipe(recipe).has_adapter():
                problems.append("no final adapter_model.safetensors")
            if problems:
                stage.status, stage.note = "failed", "; ".join(problems)
        self.complete("train_resumed")

    def train_reference(self, recipe: Path):
        """The uninterrupted run, timed part by part as bench.time_to_adapter does (the
        timeline plugin added to its recipe)."""
        stage = self.stages["train_reference"]
        if not self.blocked(stage, "data_prep", "model"):
            timeline = self.work / "reference-timeline.jsonl"
            timeline.unlink(missing_ok=True)
            env = {**self.env_for(self.lane_b), ENV_TIMELINE: str(timeline)}
            launched = time.time()
            self.run(stage, self.axolotl("train", recipe), self.lane_b, env=env)
            finished = time.time()
            stage.key = train_figures(Run.from_recipe(recipe).output_dir)
            if timeline.is_file():
                stage.key["time_to_adapter"] = breakdown(
                    read_jsonl(timeline, skip_bad_lines=True), launched, finished)
        self.complete("train_reference")

    def evaluate(self, recipe: Path):
        stage = self.stages["evaluate"]
        if not self.blocked(stage, "train_resumed"):
            cmd = [sys.executable, "-m", "eval", str(recipe), "--no-progress",
                   *shlex.split(self.args.eval_args)]
            self.run(stage, cmd, self.lane_a)
            summary = Run.from_recipe(recipe).evaluation_json
            if summary.is_file():
                stage.key = eval_figures(json.loads(summary.read_text()), stage.wall_s)
        self.complete("evaluate")

    def merge(self, recipe: Path):
        stage = self.stages["merge"]
        if not self.blocked(stage, "train_resumed"):
            self.run(stage, self.axolotl("merge-lora", recipe), self.lane_b)
            merged = Run.from_recipe(recipe).merged_dir
            weights = list(merged.glob("*.safetensors"))
            if stage.status == "ok" and not weights:
                stage.status, stage.note = "failed", f"no *.safetensors in {merged}"
            stage.key = {"merged_dir": str(merged),
                         "size_gb": round(sum(w.stat().st_size for w in weights) / 1e9, 2)}
        self.complete("merge")

    def merged_logits(self, recipe: Path):
        stage = self.stages["merged_logits"]
        if not self.blocked(stage, "merge"):
            run = Run.from_recipe(recipe)
            result = self.work / "merged-logits.json"
            cmd = [sys.executable, "-m", "bench.gpu_check", "compare-merged",
                   "--model", self.model_ref, "--run", str(run.output_dir),
                   "--merged", str(run.merged_dir), "--data", str(run.eval_data),
                   "--json", str(result)]
            if run.load_in_4bit:
                cmd.append("--load-in-4bit")
            self.run(stage, cmd, self.lane_b)
            if result.is_file():
                stage.key = json.loads(result.read_text())
                if stage.status == "ok" and not stage.key.get("ok"):
                    stage.status, stage.note = "failed", stage.key.get("verdict", "")
        self.complete("merged_logits")

    def pytest(self):
        stage = self.stages["pytest"]
        if not self.blocked(stage):
            junit = self.work / "pytest.xml"
            selection = shlex.split(self.args.pytest_args)
            if not any((REPO / a).exists() for a in selection if not a.startswith("-")):
                selection += gpu_test_files()  # collect only where GPU tests live
            cmd = [sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}"]
            self.run(stage, cmd, self.lane_a)
            stage.key = junit_counts(junit)
            if stage.key.get("tests", 0) == 0:
                stage.status, stage.note = "failed", "no test ran"
        self.complete("pytest")

    # -- orchestration

    def lane_a_work(self, run_recipe: Path):
        self.train_interrupted(run_recipe)
        self.train_resumed(run_recipe)
        self.evaluate(run_recipe)
        self.pytest()

    def lane_b_work(self, run_recipe: Path, reference_recipe: Path):
        self.train_reference(reference_recipe)
        self.done["train_resumed"].wait()
        if self.lane_b == self.lane_a:  # one GPU (or none): keep the evaluation's timing clean
            self.done["evaluate"].wait()
        self.merge(run_recipe)
        self.merged_logits(run_recipe)

    def prepare_work(self):
        self.work.mkdir(parents=True, exist_ok=True)
        for name in ("run", "reference", "prepared-run", "prepared-reference", "logs",
                     "recipes"):
            shutil.rmtree(self.work / name, ignore_errors=True)
        for name in ("pytest.xml", "merged-logits.json"):
            (self.work / name).unlink(missing_ok=True)
        self.logs.mkdir(parents=True)

    def execute(self) -> dict:
        self.prepare_work()
        with self.monitor:
            setup = [threading.Thread(target=self.data_prep), threading.Thread(target=self.model)]
            for thread in setup:
                thread.start()
            for thread in setup:
                thread.join()
            if self.model_ref:
                run_recipe = self.write_recipe("run")
                reference_recipe = self.write_recipe("reference", timed=True)
            else:
                run_recipe = reference_recipe = self.work / "recipes" / "missing.yml"
            lanes = [threading.Thread(target=self.lane_a_work, args=(run_recipe,)),
                     threading.Thread(target=self.lane_b_work,
                                      args=(run_recipe, reference_recipe))]
            for thread in lanes:
                thread.start()
            for thread in lanes:
                thread.join()
        comparison = None
        if self.stages["train_resumed"].status == "ok" and \
                self.stages["train_reference"].status == "ok":
            comparison = compare_runs(self.work / "run", self.work / "reference")
        return self.summary(comparison)

    def summary(self, comparison: dict | None) -> dict:
        ran = [s for s in self.stages.values() if s.status != "skipped" or s.note != "--skip"]
        ok = all(s.status == "ok" for s in ran)
        return {
            "schema_version": 1,
            "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "ok": ok,
            "wall_s": round(self.elapsed(), 1),
            "recipe": str(self.args.recipe),
            "overrides": self.overrides,
            "model": {"ref": self.model_ref, "kind": self.model_kind,
                      "note": self.stages["model"].note},
            "machine": machine_info(self.gpus),
            "lanes": {"a": self.lane_a, "b": self.lane_b},
            "stages": [asdict(s) for s in self.stages.values()],
            "resume_vs_uninterrupted": comparison,
            "goals": {"generate_s": GOAL_GENERATE_S, "evaluate_s": GOAL_EVALUATE_S},
        }


def gpu_test_files() -> list[str]:
    """The test files that hold `gpu`-marked tests (so that collecting the rest, which may
    import packages a bare GPU image lacks, cannot fail the GPU run)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if re.search(r"mark\.gpu\b", p.read_text(errors="replace")))


def stop_group(proc: subprocess.Popen, sig: int) -> int | None:
    """Signal the process group; wait for it (SIGKILL after KILL_GRACE_S)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def last_error_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
                 if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if re.match(r"^(\S+: )?error\b|^\w*(Error|Exception)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else ""


# Why a stage's process ended before its work was done, from its log (first match wins).
EARLY_END_PATTERNS = (
    (r"loss watchdog stopped training at step (\d+)|Loss is too high, stopping training",
     "stopped by the loss watchdog"),
    (r"\b(loss|grad_norm|eval_loss) became (nan|inf|-inf) at step (\d+)", "NaN/inf stop"),
    (r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", "out of GPU memory"),
    (r"No space left on device|Disk quota exceeded|File too large", "disk full"),
)
SIGNAL_EXITS = {-9: "SIGKILL", 137: "SIGKILL", -15: "SIGTERM", 143: "SIGTERM", -6: "SIGABRT",
                134: "SIGABRT", -11: "SIGSEGV", 139: "SIGSEGV"}


def early_end_reason(log: Path, rc: int | None) -> str:
    """Why the stage's process ended early, in a few words ("" when its log does not say):
    the loss watchdog (with the step), the NaN/inf stop, out of GPU memory, a full disk, or a
    signal (SIGKILL: often the kernel's out-of-memory killer)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    for pattern, what in EARLY_END_PATTERNS:
        found = list(re.finditer(pattern, text))
        if found:
            step = next((g for g in reversed(found[-1].groups()) if g and g.isdigit()), None)
            return what + (f" at step {step}" if step else "")
    died = re.search(r"died with <Signals\.(SIG\w+)|\b(SIGKILL|SIGTERM)\b", text)
    signal_name = SIGNAL_EXITS.get(rc) or (died and (died[1] or died[2]))
    if signal_name or re.search(r"^Killed$", text, re.M):
        name = signal_name or "SIGKILL"
        return f"killed ({name}" + (", out of host memory?" if name == "SIGKILL" else "") + ")"
    return ""


def untrained_reason(model_dir: Path) -> str | None:
    """Why a model directory looks like a random-init (not pretrained) model, or None: every
    norm weight in its safetensors is exactly 1.0, as transformers initialises them and no
    trained model keeps them. Reads only those small tensors, from the files' headers."""
    import struct

    ones = {"F32": struct.pack("<f", 1.0), "BF16": b"\x80\x3f", "F16": struct.pack("<e", 1.0)}
    seen = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                size = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(size))
                for name, info in header.items():
                    if not name.endswith("norm.weight") or info.get("dtype") not in ones:
                        continue
                    start, end = info["data_offsets"]
                    handle.seek(8 + size + start)
                    one = ones[info["dtype"]]
                    if handle.read(end - start) != one * ((end - start) // len(one)):
                        return None
                    seen += 1
        except (OSError, ValueError, KeyError, struct.error):
            return None
    return f"all {seen} norm weights are 1.0, as initialised" if seen else None


# --------------------------------------------------------------------------- figures


def prep_figures(stats: dict) -> dict:
    figures = {}
    for split in ("train", "eval"):
        part = stats.get(split) or {}
        for key in ("rows", "n_rows"):
            if key in part:
                figures[f"{split}_rows"] = part[key]
        for key in ("tokens", "n_tokens"):
            if key in part:
                figures[f"{split}_tokens"] = part[key]
    return figures


def train_rows(state: dict) -> tuple[dict[int, dict], list[int]]:
    rows, twice = {}, []
    for entry in state.get("log_history", []):
        if "loss" in entry and "step" in entry:
            if entry["step"] in rows:
                twice.append(entry["step"])
            rows[entry["step"]] = entry
    return rows, twice


def train_figures(output_dir: Path) -> dict:
    found = newest_trainer_state(output_dir)  # a truncated trainer_state.json is skipped
    if not found:
        return {}
    state = found[1]
    rows, twice = train_rows(state)
    history = state.get("log_history", [])
    evals = [e for e in history if "eval_loss" in e]
    rates = [r["tokens/train_per_sec_per_gpu"] for r in rows.values()
             if isinstance(r.get("tokens/train_per_sec_per_gpu"), int | float)]
    final = next((e for e in reversed(history) if "train_runtime" in e), {})
    figures = {
        "global_step": state.get("global_step"),
        "max_steps": state.get("max_steps"),
        "final_loss": rows[max(rows)]["loss"] if rows else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_eval_step": evals[-1].get("step") if evals else None,
        "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "train_runtime_s": final.get("train_runtime"),
    }
    if twice:
        figures["steps_logged_twice"] = twice
    return figures


def compare_runs(resumed: Path, reference: Path) -> dict:
    """Adapter and per-step loss differences of the resumed run against the uninterrupted one."""
    result: dict = {}
    got, want = newest_trainer_state(resumed), newest_trainer_state(reference)
    if got and want:
        rows_got, _ = train_rows(got[1])
        rows_want, _ = train_rows(want[1])
        common = sorted(set(rows_got) & set(rows_want))
        diffs = {s: abs(rows_got[s]["loss"] - rows_want[s]["loss"]) for s in common}
        evals_got = {e["step"]: e["eval_loss"] for e in got[1]["log_history"] if "eval_loss" in e}
        evals_want = {e["step"]: e["eval_loss"] for e in want[1]["log_history"]
                      if "eval_loss" in e}
        eval_common = sorted(set(evals_got) & set(evals_want))
        result.update({
            "steps_compared": len(common),
            "loss_max_abs_diff": max(diffs.values()) if diffs else None,
            "loss_max_abs_diff_step": max(diffs, key=diffs.get) if diffs else None,
            "final_loss": {"resumed": rows_got[common[-1]]["loss"] if common else None,
                           "uninterrupted": rows_want[common[-1]]["loss"] if common else None},
            "final_eval_loss": {
                "step": eval_common[-1] if eval_common else None,
                "resumed": evals_got[eval_common[-1]] if eval_common else None,
                "uninterrupted": evals_want[eval_common[-1]] if eval_common else None},
            "per_step_abs_diff": {str(s): diffs[s] for s in common},
        })
    a, b = resumed / "adapter_model.safetensors", reference / "adapter_model.safetensors"
    if a.is_file() and b.is_file():
        from safetensors.torch import load_file

        ta, tb = load_file(str(a)), load_file(str(b))
        if ta.keys() == tb.keys():
            max_diff = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
            scale = max(float(tb[k].float().abs().max()) for k in tb)
            result["adapter_max_abs_diff"] = max_diff
            result["adapter_max_abs"] = scale
            result["adapter_max_rel_diff"] = max_diff / scale if scale else None
        else:
            result["adapter_keys_differ"] = sorted(set(ta) ^ set(tb))[:10]
    return result


def eval_figures(summary: dict, wall_s: float | None) -> dict:
    seconds = summary.get("seconds", {})
    gen = summary.get("generation") or {}
    ppl = summary.get(HELD_OUT_CORPUS_PPL) or {}
    return {
        "wall_s": wall_s,
        "load_s": seconds.get("load"),
        "perplexity_s": seconds.get("perplexity"),
        "generate_s": gen.get("seconds"),
        "generated_tokens": gen.get("new_tokens"),
        "generated_tokens_per_s": gen.get("tokens_per_s"),
        "report_s": seconds.get("report"),
        "held_out_ppl_base": ppl.get("base"),
        "held_out_ppl_adapter": ppl.get("adapter"),
    }


def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None][:20]
    return counts


def machine_info(gpus: list[dict]) -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    return {
        "gpus": gpus,
        "python": sys.version.split()[0],
        "packages": {n: version(n) for n in ("torch", "transformers", "peft", "accelerate",
                                             "axolotl", "bitsandbytes", "datasets", "trl",
                                             "liger-kernel", "huggingface-hub")},
        "cpus": os.cpu_count(),
        "commit": commit,
    }


def gpu_slug(gpus: list[dict]) -> str:
    if not gpus:
        return "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", gpus[0]["name"].lower()).strip("-")
    return f"{len(gpus)}x-{name}" if len(gpus) > 1 else name


# --------------------------------------------------------------------------- the summary


def _fmt(value, digits=1, suffix=""):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else f"{value}{suffix}"


def key_figure(stage: dict, summary: dict) -> str:
    k = stage["key"]
    name = stage["name"]
    if name == "data_prep" and k:
        return (f"train {_fmt(k.get('train_rows'))} rows / {_fmt(k.get('train_tokens'))} tokens, "
                f"eval {_fmt(k.get('eval_rows'))} / {_fmt(k.get('eval_tokens'))}")
    if name == "model" and k:
        return f"{k.get('kind')}: `{k.get('model')}`"
    if name == "train_interrupted" and k:
        return (f"{k['checkpoint']} complete {k['killed_at_s']} s after start, then SIGTERM "
                f"(exit {k['exit']})")
    if name in ("train_resumed", "train_reference") and k:
        text = ""
        if name == "train_resumed":
            text = f"resumed from step {_fmt(k.get('resumed_from_step'))}, "
        evaluated = (f", eval loss {_fmt(k.get('final_eval_loss'), 4)} (step "
                     f"{k.get('final_eval_step')})" if k.get("final_eval_loss") is not None
                     else "")
        timed = k.get("time_to_adapter") or {}
        waited = (f"; time to adapter {_fmt(timed['time_to_adapter_s'])} s ("
                  + ", ".join(f"{part.removesuffix('_s').replace('_', ' ')} {_fmt(seconds)}"
                              for part, seconds in timed["parts"].items()) + ")"
                  if timed.get("parts") else "")
        return (text + f"step {_fmt(k.get('global_step'))}/{_fmt(k.get('max_steps'))}, final "
                f"loss {_fmt(k.get('final_loss'), 4)}{evaluated}, "
                f"{_fmt(k.get('tokens_per_s_median'), 0)} tok/s (median step)" + waited)
    if name == "evaluate" and k:
        return (f"held-out ppl {_fmt(k.get('held_out_ppl_base'), 2)} → "
                f"{_fmt(k.get('held_out_ppl_adapter'), 2)}; load {_fmt(k.get('load_s'))} s, "
                f"perplexity {_fmt(k.get('perplexity_s'))} s, generate "
                f"{_fmt(k.get('generate_s'))} s ({_fmt(k.get('generated_tokens'))} tokens, "
                f"{_fmt(k.get('generated_tokens_per_s'), 0)} tok/s), report "
                f"{_fmt(k.get('report_s'))} s")
    if name == "merge" and k:
        return f"{_fmt(k.get('size_gb'), 2)} GB written"
    if name == "merged_logits" and k:
        w = k.get("weights") or {}
        kept = k.get("loss_gain_kept")
        share = w.get("delta_vs_base_mean")
        return (f"{w.get('layers', 0)} LoRA layers: merged = base + adapter up to "
                f"{w.get('stored_dtype')} rounding: {'yes' if w.get('ok') else 'NO'}; LoRA change"
                f" missed by the stored weights {_fmt(w.get('delta_missed_pct_mean'), 1)} % "
                f"(the change is {_fmt(100 * share if share else None, 2)} % of the weights); "
                f"held-out loss {_fmt(k.get('nll_merged'), 4)} merged vs "
                f"{_fmt(k.get('nll_adapter'), 4)} base + adapter vs {_fmt(k.get('nll_base'), 4)} "
                f"base ({_fmt(100 * kept if kept is not None else None, 1)} % of the gain kept), "
                f"top-1 agree {_fmt(k.get('top1_agreement'), 3)}, max |Δlogit| "
                f"{_fmt(k.get('max_abs_logit_diff'), 3)} (adapter's own effect "
                f"{_fmt(k.get('adapter_effect_max_abs'), 3)})")
    if name == "pytest" and k:
        return (f"{k.get('passed', 0)} passed, {k.get('failures', 0) + k.get('errors', 0)} "
                f"failed, {k.get('skipped', 0)} skipped")
    return ""


def verdict(summary: dict) -> str:
    skipped = [s["name"] for s in summary["stages"] if s["status"] == "skipped"]
    if not summary["ok"]:
        return "FAILED"
    return "all stages ok" if not skipped else (
        f"every stage that ran is ok; skipped: {', '.join(skipped)}")


def render_summary(summary: dict) -> str:
    machine = summary["machine"]
    gpus = machine["gpus"]
    gpu_text = (", ".join(f"GPU {g['index']} {g['name']} ({g['memory_mib']:,} MiB)" for g in gpus)
                + f", driver {gpus[0]['driver']}") if gpus else "no NVIDIA GPU (CPU run)"
    packages = ", ".join(f"{n} {v}" for n, v in machine["packages"].items() if v)
    model = summary["model"]
    lines = [
        f"# GPU check: {verdict(summary)}",
        "",
        f"- {summary['date']}, {summary['wall_s']:.0f} s in all; commit "
        f"{machine['commit'] or 'n/a'}; {gpu_text}; {machine['cpus']} CPUs",
        f"- recipe `{summary['recipe']}`"
        + (f" with {json.dumps(summary['overrides'])}" if summary["overrides"] else "")
        + f"; model: **{model['kind']}** `{model['ref']}` ({model['note']})",
        f"- Python {machine['python']}; {packages}",
        f"- GPU lanes: interrupted/resumed run, evaluation, pytest on GPU {summary['lanes']['a']};"
        f" uninterrupted run, merge, merged check on GPU {summary['lanes']['b']}",
        "",
        "| stage | status | wall | peak GPU memory | key figure |",
        "|---|---|---|---|---|",
    ]
    for stage in summary["stages"]:
        mem = stage["peak_gpu_mib"] or stage["gpu_used_peak_mib"]
        mem_text = "n/a" if not mem else f"{mem / 1024:.1f} GiB" + (
            "" if stage["peak_gpu_mib"] else " (whole GPU)")
        status = stage["status"] + (f": {stage['note']}" if stage["note"] and
                                    stage["status"] != "ok" else "")
        lines.append(f"| {stage['title']} | {status} | {_fmt(stage['wall_s'], 0, ' s')} | "
                     f"{mem_text} | {key_figure(stage, summary).replace('|', '/')} |")
    comparison = summary.get("resume_vs_uninterrupted")
    if comparison:
        final = comparison.get("final_loss", {})
        final_eval = comparison.get("final_eval_loss", {})
        lines += [
            "",
            "## Resumed vs uninterrupted",
            "",
            f"- training loss over {comparison.get('steps_compared')} common steps: max |Δ| "
            f"{_fmt(comparison.get('loss_max_abs_diff'), 6)} (step "
            f"{comparison.get('loss_max_abs_diff_step')}); final "
            f"{_fmt(final.get('resumed'), 4)} vs {_fmt(final.get('uninterrupted'), 4)}",
            f"- eval loss at the last step both evaluated (step {final_eval.get('step')}): "
            f"{_fmt(final_eval.get('resumed'), 4)} vs {_fmt(final_eval.get('uninterrupted'), 4)}",
            f"- final adapter: max |Δ| {_fmt(comparison.get('adapter_max_abs_diff'), 6)} (largest "
            f"weight {_fmt(comparison.get('adapter_max_abs'), 4)}, relative "
            f"{_fmt(comparison.get('adapter_max_rel_diff'), 6)})",
        ]
    ev = next(s for s in summary["stages"] if s["name"] == "evaluate")
    if ev["key"]:
        k = ev["key"]
        lines += [
            "",
            "## Evaluation time",
            "",
            f"- `python -m eval RECIPE` (loading included): {_fmt(ev['wall_s'], 0)} s "
            f"(goal ≤ {summary['goals']['evaluate_s']} s on one H100/H200 with the 4-bit 7B)",
            f"- generation of the default set: {_fmt(k.get('generate_s'))} s, "
            f"{_fmt(k.get('generated_tokens_per_s'), 0)} generated tokens/s (goal ≤ "
            f"{summary['goals']['generate_s']} s after loading)",
        ]
    lines += ["", "Commands (stage logs: `logs.txt`):", ""]
    lines += [f"- {s['name']}: `{s['command']}`" for s in summary["stages"] if s["command"]]
    lines.append("")
    return "\n".join(lines)


def write_outputs(summary: dict, out: Path, work: Path) -> list[Path]:
    files = {
        "summary.json": json.dumps(summary, indent=2) + "\n",
        "summary.md": render_summary(summary),
    }
    tails = []
    for stage in summary["stages"]:
        if stage["log"] and Path(stage["log"]).is_file():
            lines = Path(stage["log"]).read_text(errors="replace").splitlines()
            tails.append(f"===== {stage['name']} ({stage['status']}): {stage['command']}\n"
                         + "\n".join(lines[-LOG_TAIL_LINES:]))
    files["logs.txt"] = "\n\n".join(tails) + "\n"
    for name in ("perplexity.md", "generations.md"):
        source = work / "run" / "eval" / name
        if source.is_file():
            files[name] = source.read_text()
    # paths inside the checkout are shown relative to it: the summary is committed
    return write_files(out, {name: text.replace(f"{REPO}/", "") for name, text in files.items()})


# --------------------------------------------------------------------------- merged vs adapter


def merged_weight_check(model, merged_dir: Path) -> dict:
    """Every LoRA layer's weight in the merged checkpoint against the weight the evaluated model
    computes with: its base weight (dequantised when 4-bit) plus scale * B @ A, in fp32. Tells a
    merge that adds the wrong thing from the rounding of a right sum to the stored dtype."""
    from safetensors import safe_open

    layers, missing = [], []
    with contextlib.ExitStack() as files:  # each shard opened once, read tensor by tensor
        handles = {}
        for file in sorted(Path(merged_dir).glob("*.safetensors")):
            handle = files.enter_context(safe_open(file, "pt"))
            handles.update(dict.fromkeys(handle.keys(), handle))
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            key = name.split("base_model.model.", 1)[-1] + ".weight"
            if key not in handles:
                missing.append(key)
                continue
            weight = module.base_layer.weight
            if weight.__class__.__name__ == "Params4bit":
                import bitsandbytes.functional as bnb_functional

                base = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
            else:
                base = weight.detach().float()
            # in fp32 from the fp32 copies (peft's get_delta_weight keeps bf16 LoRA weights' dtype)
            delta = module.scaling["default"] * (module.lora_B["default"].weight.detach().float()
                                                 @ module.lora_A["default"].weight.detach().float())
            stored = handles[key].get_tensor(key).to(base.device)
            merged, expected = stored.float(), base + delta
            rounding = float((expected.to(stored.dtype).float() - expected).abs().mean())
            error = float((merged - expected).abs().mean())
            allowed = MERGED_ROUNDING_ALLOWANCE * rounding + 1e-6 * float(expected.abs().mean())
            delta_mean = float(delta.abs().mean())
            layers.append({
                "layer": key, "stored_dtype": str(stored.dtype).removeprefix("torch."),
                "error_mean_abs": error, "rounding_mean_abs": rounding, "ok": error <= allowed,
                "delta_mean_abs": delta_mean, "base_mean_abs": float(base.abs().mean()),
                # how much of the LoRA change the stored weights miss (rounding included)
                "delta_missed_pct": 100 * float(((merged - base) - delta).abs().mean())
                / max(delta_mean, 1e-30),
            })
    worst = max(layers, key=lambda r: r["error_mean_abs"] / max(r["rounding_mean_abs"], 1e-30),
                default=None)
    return {
        "layers": len(layers), "missing": missing,
        "ok": bool(layers) and not missing and all(r["ok"] for r in layers),
        "layers_over_rounding": [r["layer"] for r in layers if not r["ok"]][:10],
        "stored_dtype": layers[0]["stored_dtype"] if layers else None,
        "delta_missed_pct_mean": (sum(r["delta_missed_pct"] for r in layers) / len(layers)
                                  if layers else None),
        "delta_vs_base_mean": (sum(r["delta_mean_abs"] / r["base_mean_abs"] for r in layers)
                               / len(layers) if layers else None),
        "worst": worst,
    }


def merged_verdict(weights: dict, loss_ok: bool, gain_kept, nll_merged: float,
                   nll_adapter: float) -> str:
    if not weights["ok"]:
        where = weights["missing"][:3] or weights["layers_over_rounding"][:3]
        return (f"merged weights are not base + adapter (beyond {weights['stored_dtype']} "
                f"rounding) in {', '.join(where) or 'no LoRA layer found'}")
    losses = f"held-out loss {nll_merged:.4f} merged vs {nll_adapter:.4f} base + adapter"
    if not loss_ok:
        return f"merged weights right, but the merged model lost the adapter's gain: {losses}"
    kept = f", {100 * gain_kept:.1f} % of the adapter's gain kept" if gain_kept is not None else ""
    return (f"merged weights = base + adapter up to {weights['stored_dtype']} rounding in all "
            f"{weights['layers']} LoRA layers; {losses}{kept}")


def compare_merged(argv) -> int:
    """Held-out logits of the merged model against base + adapter (the model evaluated)."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check compare-merged")
    parser.add_argument("--model", required=True)
    parser.add_argument("--run", type=Path, required=True, help="the adapter's run directory")
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from eval.common import (
        base_model_context,
        encode,
        load_model,
        load_tokenizer,
        quiet_library_logs,
        read_texts,
        resolve_device,
    )

    quiet_library_logs()
    device, dtype = resolve_device(args.load_in_4bit)
    tok = load_tokenizer(args.model)
    rows = [ids[: args.max_tokens] for ids in
            encode(tok, read_texts(args.data)[: args.rows])[0] if len(ids) > 1]

    def logits_of(model) -> list:
        out = []
        with torch.inference_mode():
            for ids in rows:
                x = torch.tensor([ids], device=device)
                out.append(model(input_ids=x).logits[0].float().cpu())
        return out

    started = time.perf_counter()
    model = load_model(args.model, args.run, load_in_4bit=args.load_in_4bit)
    adapter = logits_of(model)
    weights = merged_weight_check(model, args.merged)
    with base_model_context(model):
        base = logits_of(model)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    placement = {"device_map": {"": 0}} if device.type == "cuda" else {}
    merged_model = AutoModelForCausalLM.from_pretrained(str(args.merged), dtype=dtype, **placement)
    merged_model.to(device).eval()
    merged = logits_of(merged_model)

    def nll(logits_list) -> float:
        total, count = 0.0, 0
        for logits, ids in zip(logits_list, rows, strict=True):
            target = torch.tensor(ids[1:])
            total += float(torch.nn.functional.cross_entropy(logits[:-1], target,
                                                             reduction="sum"))
            count += len(ids) - 1
        return total / count

    def abs_diff_stats(pairs) -> tuple[float, float]:
        """(max, mean) of |x - y| over all positions, one row at a time."""
        top, total, count = 0.0, 0.0, 0
        for x, y in pairs:
            d = (x - y).abs()
            top, total, count = max(top, float(d.max())), total + float(d.sum()), count + d.numel()
        return top, total / count

    diff_max, diff_mean = abs_diff_stats(zip(merged, adapter, strict=True))
    effect_max, effect_mean = abs_diff_stats(zip(adapter, base, strict=True))
    agree = sum(int((m.argmax(-1) == a.argmax(-1)).sum()) for m, a in zip(merged, adapter,
                                                                         strict=True))
    nll_merged, nll_adapter, nll_base = nll(merged), nll(adapter), nll(base)
    rel = abs(nll_merged - nll_adapter) / nll_adapter
    top1 = agree / sum(len(r) for r in rows)
    gain = nll_base - nll_adapter
    gain_kept = (nll_base - nll_merged) / gain if gain > 0 else None
    loss_ok = gain_kept >= MERGED_GAIN_KEPT_MIN if gain_kept is not None else (
        rel <= MERGED_NLL_TOLERANCE)
    ok = weights["ok"] and loss_ok
    result = {
        "rows": len(rows), "tokens": sum(len(r) for r in rows),
        "base_as_evaluated": "nf4 (4-bit) + adapter" if args.load_in_4bit else
        f"{str(dtype).removeprefix('torch.')} + adapter",
        "merged_dtype": str(dtype).removeprefix("torch."),
        "nll_merged": nll_merged, "nll_adapter": nll_adapter, "nll_base": nll_base,
        "nll_rel_diff_pct": 100 * rel,
        "max_abs_logit_diff": diff_max, "mean_abs_logit_diff": diff_mean,
        "adapter_effect_max_abs": effect_max, "adapter_effect_mean_abs": effect_mean,
        "top1_agreement": top1, "loss_gain_kept": gain_kept,
        "weights": weights,
        "seconds": round(time.perf_counter() - started, 1),
        "ok": ok,
        "verdict": merged_verdict(weights, loss_ok, gain_kept, nll_merged, nll_adapter),
    }
    write_file(args.json, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--model", default="auto",
                        help="base model: a directory or hub id (default auto: see below)")
    parser.add_argument("--random-model-dir", type=Path, default=DEFAULT_RANDOM_MODEL,
                        help="where the random-init model is built (kept for the next run)")
    parser.add_argument("--tokenizer-from", type=Path,
                        help="tokenizer files for the random-init model (default: the "
                        "mistral-common package)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="runs, merged model and logs (its run folders are replaced)")
    parser.add_argument("--out", type=Path, help="summary directory (default OUT_ROOT/<date>-<gpu>)")
    parser.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT)
    parser.add_argument("--skip", default="", help=f"comma-separated stages: {', '.join(STAGES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="override a recipe key for every run (e.g. max_steps=6)")
    parser.add_argument("--launcher", choices=("auto", "axolotl", "python"), default="auto",
                        help="`axolotl train` (auto: when the accelerate command exists) or "
                        "`python -m axolotl.cli.train`")
    parser.add_argument("--deadline-s", type=float,
                        help="stop starting stages, and kill running ones, this many seconds "
                        "after the start (the summary is still written)")
    parser.add_argument("--prep-args", default="", help="extra data_prep arguments")
    parser.add_argument("--eval-args", default="", help="extra `python -m eval` arguments")
    parser.add_argument("--pytest-args", default="-m gpu", help="pytest selection")
    args = parser.parse_args(argv)
    unknown = {s.strip() for s in args.skip.split(",") if s.strip()} - set(STAGES)
    if unknown:
        parser.error(f"--skip: unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    if not (REPO / args.recipe).is_file():
        parser.error(f"--recipe {args.recipe}: not found (run from the repository root)")
    return args


def run(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare-merged"]:
        return compare_merged(argv[1:])
    args = parse_args(argv)
    os.chdir(REPO)  # recipes and data paths are relative to the repository root
    check = Check(args)
    summary = check.execute()
    day = dt.date.today().isoformat()
    out = args.out or args.out_root / f"{day}-{gpu_slug(check.gpus)}"
    written = write_outputs(summary, out, check.work)
    print(render_summary(summary))
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK if summary["ok"] else EXIT_FAILED


main = cli(run, prog="gpu_check")


if __name__ == "__main__":
    raise SystemExit(main())
