"""Why a stage's process ended before its work was done, read from its log.

`early_end_reason(log, rc)` names it in a few words: Axolotl's loss watchdog (with the step), the
recipe guard's NaN/inf stop, out of GPU memory, a full disk, or a signal (SIGKILL: often the
kernel's out-of-memory killer); `last_error_line(log)` quotes the line that says what failed.
"""

from __future__ import annotations

import re
from pathlib import Path

# first match wins
EARLY_END_PATTERNS = (
    (r"loss watchdog stopped training at step (\d+)|Loss is too high, stopping training",
     "stopped by the loss watchdog"),
    (r"\b(loss|grad_norm|eval_loss) became (nan|inf|-inf) at step (\d+)", "NaN/inf stop"),
    (r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", "out of GPU memory"),
    (r"No space left on device|Disk quota exceeded|File too large", "disk full"),
)
SIGNAL_EXITS = {-9: "SIGKILL", 137: "SIGKILL", -15: "SIGTERM", 143: "SIGTERM", -6: "SIGABRT",
                134: "SIGABRT", -11: "SIGSEGV", 139: "SIGSEGV"}


def _text(log: Path) -> str:
    try:
        return Path(log).read_text(errors="replace")
    except OSError:
        return ""


def early_end_reason(log: Path, rc: int | None) -> str:
    """Why the stage's process ended early, in a few words ("" when its log does not say)."""
    text = _text(log)
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


def last_error_line(log: Path) -> str:
    """The last `error: ...` / `SomeError: ...` line of the log, else its last line."""
    lines = [line.strip() for line in _text(log).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^(\S+: )?error\b|^\w*(Error|Exception)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else ""
