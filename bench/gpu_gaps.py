"""Where the GPU waits in a profiled step: its idle gaps, read from a torch profiler trace.

A step whose GPU work is shorter than the step is waiting for the host somewhere. The profile's
tables say how much; the trace says when: between two device events (kernels, copies, memsets)
the GPU ran nothing, and the host was inside some Python function at that moment. For every gap
of at least `min_gap_us` this reports its length and the innermost Python frames (and the
torch op, if any) running at its midpoint, then the gaps' total by those frames.

    python -m bench.gpu_gaps TRACE.json[.gz] [--min-gap-us 100]

`bench/step_recorder.py` writes such a trace (BENCH_PROFILE_TRACE=1) and this summary beside
its profile.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


@dataclass(frozen=True)
class Gap:
    start_us: float  # from the first event of the trace
    length_us: float
    frames: tuple[str, ...]  # innermost Python frames at the midpoint, innermost first
    op: str | None  # innermost torch op at the midpoint


def load_trace(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def _spans(events: list[dict], categories: set[str]) -> list[tuple[float, float, str]]:
    return sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", ""))
                  for e in events if e.get("ph") == "X" and e.get("cat") in categories)


def _innermost(spans: list[tuple[float, float, str]], at: float, depth: int) -> list[str]:
    covering = [s for s in spans if s[0] <= at <= s[1]]
    covering.sort(key=lambda s: s[1] - s[0])
    return [name for _, _, name in covering[:depth]]


def find_gaps(trace: dict, min_gap_us: float = 100.0, depth: int = 3) -> tuple[list[Gap], dict]:
    """The device's idle gaps between its first and last event, and the totals."""
    events = trace.get("traceEvents", [])
    device = _spans(events, DEVICE_CATEGORIES)
    if not device:
        return [], {"device_events": 0}
    python = _spans(events, {"python_function"})
    ops = _spans(events, {"cpu_op"})
    origin = min(float(e["ts"]) for e in events if e.get("ph") == "X" and "ts" in e)
    gaps, busy_us, end = [], 0.0, device[0][0]
    for start, stop, _ in device:
        if start - end >= min_gap_us:
            mid = (start + end) / 2
            op = _innermost(ops, mid, 1)
            gaps.append(Gap(end - origin, start - end, tuple(_innermost(python, mid, depth)),
                            op[0] if op else None))
        busy_us += max(0.0, stop - max(start, end))
        end = max(end, stop)
    totals = {"device_events": len(device), "span_us": end - device[0][0], "busy_us": busy_us,
              "gaps": len(gaps), "gaps_us": sum(g.length_us for g in gaps)}
    return gaps, totals


def summary(gaps: list[Gap], totals: dict, top: int = 25) -> str:
    """The gaps grouped by where the host was, longest total first, then the longest gaps."""
    if not totals.get("device_events"):
        return "no device events in the trace"
    by_place: dict[str, list[float]] = defaultdict(list)
    for gap in gaps:
        by_place[" < ".join(gap.frames) or (gap.op or "?")].append(gap.length_us)
    lines = [f"device busy {totals['busy_us'] / 1e3:.1f} ms of {totals['span_us'] / 1e3:.1f} ms "
             f"from its first to its last event; {totals['gaps']} gaps "
             f"= {totals['gaps_us'] / 1e3:.1f} ms idle",
             "", "idle ms  gaps  where the host was (innermost Python frames first)"]
    for place, lengths in sorted(by_place.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(lengths) / 1e3:7.2f}  {len(lengths):4d}  {place}")
    lines += ["", "longest gaps: start ms, length ms, torch op, frames"]
    for gap in sorted(gaps, key=lambda g: -g.length_us)[:top]:
        lines.append(f"{gap.start_us / 1e3:8.2f} {gap.length_us / 1e3:7.2f}  {gap.op or '-'}  "
                     + " < ".join(gap.frames))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-us", type=float, default=100.0)
    args = parser.parse_args(argv)
    gaps, totals = find_gaps(load_trace(args.trace), args.min_gap_us)
    print(summary(gaps, totals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
