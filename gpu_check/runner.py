"""How gpu-check runs a stage: one real subprocess, timed, logged, watched, stopped on time.

A `Runner` holds the stages (`Stage`: status, command, wall time, peak GPU memory, key figure,
note), the check's deadline and the GPU monitor. `run(stage, cmd, gpu)` starts the command in its
own process group with the project's environment (core/launch.py) on one GPU lane, its output in
logs/NAME.log; a `watch()` that returns True stops it with SIGTERM (the interrupted training),
the deadline kills it. `blocked` says whether a stage may start (skipped by the user, a stage it
needs not ok, the deadline passed); `complete` prints its final status and lets the stages
waiting for it go on. The stages run in threads, two GPU lanes at once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.launch import CODE_ROOT, environment, shown, stop_group
from gpu_check.logs import early_end_reason, last_error_line
from gpu_check.monitor import GpuMonitor, gpu_inventory

POLL_S = 0.5
_SAY = threading.Lock()


def now() -> float:
    return time.monotonic()


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


class Runner:
    """Stages as processes; see the module docstring."""

    def __init__(self, titles: dict[str, str], logs: Path, skip: set[str],
                 deadline_s: float | None):
        self.t0 = now()
        self.deadline = self.t0 + deadline_s if deadline_s else None
        self.logs = logs
        self.skip = skip
        self.stages = {name: Stage(name, title) for name, title in titles.items()}
        self.done = {name: threading.Event() for name in titles}
        self.gpus = gpu_inventory()
        self.monitor = GpuMonitor(enabled=bool(self.gpus))
        # gpu-check may fetch the real model from the hub: HF_HUB_OFFLINE stays as it is set
        self.env_base = environment(hub=True)

    def env_for(self, gpu: str | None) -> dict:
        return self.env_base if gpu is None else {**self.env_base, "CUDA_VISIBLE_DEVICES": gpu}

    def elapsed(self) -> float:
        return now() - self.t0

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
        stage.command = shown(cmd)
        stage.gpu = gpu
        stage.log = str(self.logs / f"{stage.name}.log")
        stage.start_s = round(self.elapsed(), 1)
        say(f"[gpu-check +{stage.start_s:.0f}s] {stage.name}: {stage.command}"
            + (f"  (GPU {gpu})" if gpu is not None else ""))
        start = now()
        with open(stage.log, "w") as log:
            proc = subprocess.Popen(cmd, cwd=CODE_ROOT, env=env or self.env_for(gpu), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.monitor.track(stage, proc.pid)
            try:
                self._wait(stage, proc, watch)
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

    def _wait(self, stage: Stage, proc: subprocess.Popen, watch) -> None:
        while proc.poll() is None:
            if watch is not None and watch():
                stage.rc = stop_group(proc, signal.SIGTERM)
                return
            if self.deadline and now() >= self.deadline:
                stop_group(proc, signal.SIGTERM)
                stage.status, stage.note = "timeout", "killed at the deadline"
                return
            time.sleep(POLL_S)
        stage.rc = proc.returncode

    def complete(self, name: str):
        """The stage's final status is known: print it and let waiting stages go on."""
        stage = self.stages[name]
        wall = f" in {stage.wall_s:.0f} s" if stage.wall_s is not None else ""
        note = f" ({stage.note})" if stage.note else ""
        say(f"[gpu-check +{self.elapsed():.0f}s] {name}: {stage.status}{wall}{note}")
        self.done[name].set()
