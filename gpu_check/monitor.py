"""The GPUs of this machine and the memory the stages' processes hold on them (nvidia-smi).

`gpu_inventory()` lists the GPUs; a `GpuMonitor` polls nvidia-smi in a thread while stages run
and keeps, for each stage, the peak memory of its own processes (the stage's process and every
process below it, from /proc) and the peak of the whole GPU it runs on. Without nvidia-smi both
are empty: the check runs on a CPU too.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from pathlib import Path

POLL_S = 0.5


def nvidia_smi(*query: str) -> list[list[str]]:
    """The rows of an nvidia-smi CSV query ([] without nvidia-smi or when it fails)."""
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
    """Polls nvidia-smi; the peak memory of each running stage's processes and of its GPU
    (written into the stage's `peak_gpu_mib` and `gpu_used_peak_mib`)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.running: dict[str, tuple[object, int]] = {}
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

    def track(self, stage, pid: int):
        with self.lock:
            self.running[stage.name] = (stage, pid)

    def untrack(self, stage):
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
