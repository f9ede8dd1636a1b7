"""Names shared by the benchmark's processes (kept free of heavy imports)."""

from __future__ import annotations

import platform
from pathlib import Path

ENV_STEPS_PATH = "BENCH_STEPS_JSONL"  # where a run's StepRecorder writes its JSON lines


def rank_path(base: str | Path, rank: int) -> Path:
    """`steps.jsonl` -> `steps.rank0.jsonl` (one file per process of a multi-GPU run)."""
    base = Path(base)
    return base.with_name(f"{base.stem}.rank{rank}{base.suffix or '.jsonl'}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
