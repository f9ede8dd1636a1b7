"""Writes that never leave a half-written file or folder behind, and JSONL reading.

Every writer of this repository writes into a temporary name beside its target and renames it
into place only when everything was written, so an error part-way (a full disk, a file-size
limit, no permission, a kill) leaves the previous outputs as they were and no temporary files:

- `staged_file(path)`   a temporary path, renamed onto `path` when the block succeeds
- `write_file(path, content)` / `write_files(folder, {name: content})` (all files or none)
- `staged_dir(path)`    a temporary folder that replaces the folder `path` when the block
                        succeeds (the previous folder is put back if the swap fails)

They raise OSError; callers turn it into their own one-line UserError (`os_reason` gives the
short reason: "No space left on device"). New files and folders get the usual permissions
(0666/0777 less the umask), not the private ones of `tempfile`.

JSONL: `read_jsonl` (one JSON object per line, errors naming the line), `read_text_rows`
(the {"text": ...} rows of a completion dataset), `append_jsonl` (one record per write, so a
file cut by a kill still parses up to its last whole line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core.errors import UserError, first_line

TEXT_ROW_FIX = 'each line must be one JSON object like {"text": "..."}'


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_reason(err: BaseException) -> str:
    """The short reason of a failed write: strerror ("No space left on device"), else the first
    line of the message (safetensors: "Error while serializing: I/O error: ...")."""
    return getattr(err, "strerror", None) or first_line(err)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder; renamed onto `path` if the block succeeds and the
    file was written, removed in every case otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files 0600
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _encoded(content: str | bytes) -> bytes:
    return content.encode("utf-8") if isinstance(content, str) else content


def write_file(path: Path, content: str | bytes) -> Path:
    """`content` (str as UTF-8) into `path`, atomically."""
    with staged_file(path) as tmp:
        tmp.write_bytes(_encoded(content))
    return Path(path)


def write_json(path: Path, data, **dumps) -> Path:
    """`data` as indented JSON plus a final newline, atomically."""
    return write_file(path, json.dumps(data, indent=2, **dumps) + "\n")


def write_files(folder: Path, files: dict[str, str | bytes]) -> list[Path]:
    """Every file to a temporary name in `folder` first, then all renamed into place: an
    error part-way leaves every earlier output in `folder` untouched."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        staged = []
        for name, content in files.items():
            tmp = stack.enter_context(_unrenamed(folder / name))
            tmp.write_bytes(_encoded(content))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files 0600
            staged.append((tmp, folder / name))
        for tmp, final in staged:
            os.replace(tmp, final)
    return [final for _, final in staged]


@contextlib.contextmanager
def _unrenamed(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, removed on exit unless renamed by the caller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


# --------------------------------------------------------------------------- folders


@contextlib.contextmanager
def staged_dir(path: Path, keep_existing: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside `path`; when the block succeeds it replaces `path`
    (an existing folder there is moved aside first and put back if the swap fails). On any
    error the temporary folder is removed and `path` is left as it was. `keep_existing`: a
    folder that is at `path` by then (another process made the same one) is kept, not
    replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-new-", dir=path.parent))
    retired = None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
        if path.exists():
            if keep_existing:
                return
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
            os.replace(path, retired / path.name)
        try:
            os.replace(staging, path)
        except BaseException:
            if retired is not None and not path.exists():
                os.replace(retired / path.name, path)  # put the previous folder back
            elif keep_existing and path.exists():
                return  # made meanwhile by another process: kept
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------- JSONL


def _json_lines(path: Path, text: str | None, skip_bad_lines: bool,
                fix: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line."""
    raw = Path(path).read_text(encoding="utf-8") if text is None else text
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            if not skip_bad_lines:
                raise UserError(f"{path} line {number}: not valid JSON ({err.msg}): {fix}"
                                ) from None


def read_jsonl(path: Path, *, skip_bad_lines: bool = False, text: str | None = None,
               fix: str = "each line must be one JSON object") -> list[dict]:
    """The JSON objects of a JSONL file, blank lines skipped. A line that is not a JSON object
    raises UserError naming the file and line (`fix` is the advice appended), or is skipped
    with `skip_bad_lines` (a file whose last line was cut by a kill). `text` is the file's
    content when the caller has read it already."""
    records = []
    for number, value in _json_lines(path, text, skip_bad_lines, fix):
        if isinstance(value, dict):
            records.append(value)
        elif not skip_bad_lines:
            raise UserError(f"{path} line {number}: a JSON {type(value).__name__}, not an "
                            f"object: {fix}")
    return records


def read_text_rows(path: Path, text: str | None = None, field: str = "text") -> list[str]:
    """The `field` strings of a completion dataset (JSONL, {"text": ...} per line, blank lines
    skipped); a line without a non-empty string there raises UserError naming the line."""
    rows = []
    for number, record in _json_lines(path, text, False, TEXT_ROW_FIX):
        where = f"{path} line {number}"
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f'{where}: no "{field}" key (found: {keys or "nothing"}): '
                            f"{TEXT_ROW_FIX}")
        value = record[field]
        if not isinstance(value, str):
            raise UserError(f'{where}: "{field}" is {type(value).__name__}, not a string: '
                            f"{TEXT_ROW_FIX}")
        if not value.strip():
            raise UserError(f'{where}: "{field}" is empty: remove the line or regenerate the '
                            "file")
        rows.append(value)
    return rows


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line appended in one write: a file cut part-way stays valid up to its last
    whole line (read it with `read_jsonl(path, skip_bad_lines=True)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
