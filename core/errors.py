"""One user-error type, one way to report it, one exit-status convention.

Every command of this repository ends with one of three exit statuses:

    0  done.
    1  it ran, and what it ran or checked failed: a checker found problems
       (`python -m integrations.recipe_guard`), a benchmark run or a gpu-check stage failed,
       an export check failed. An unexpected crash (Python's traceback) also exits 1.
    2  a user error: a bad input, a missing file, a setting to change, a full disk. The command
       stopped with one `error:` line naming the file or field and the fix, and left earlier
       outputs as they were (argparse's usage errors exit 2 as well).

Code raises `UserError(message)`; a command's `main` is `cli(run, prog=...)`, which prints
`[prog: ]error: message` on stderr and returns 2. Code that runs inside another program (an
Axolotl plugin's hooks, a Trainer callback) cannot return a status: around it, `reported()`
prints the line and lets the error end that program with status 2.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2


class UserError(SystemExit):
    """A bad input or setting, reported as one line that names the file/field and the fix.

    A `SystemExit` (with code 2), so that it passes through the broad `except Exception`
    handlers of the libraries our code is called from, never turning into a traceback wall.
    `str(err)` is the message; several problems may be given as several lines.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.code = EXIT_USER_ERROR

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


def stop_on(problems: list[str]) -> None:
    """Stop with every problem found (one line each), if there is any."""
    if problems:
        raise UserError("\n".join(problems))


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to
    `limit` characters: how another library's error is quoted inside one of our lines."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err`, then what it was raised from (`__cause__`, else `__context__`), without cycles:
    libraries wrap the error that matters (transformers wraps the hub's in an OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def error_lines(err: UserError | str, prog: str | None = None) -> str:
    """`[prog: ]error: ...`, one line per line of the message."""
    prefix = f"{prog}: error: " if prog else "error: "
    return "\n".join(prefix + line for line in str(err).splitlines() or [""])


def cli(run: Callable[..., int | None], prog: str | None = None) -> Callable[..., int]:
    """`main(argv=None) -> int` from `run(argv)`: a UserError becomes its `error:` line(s) on
    stderr and exit status 2; `run`'s own return value (None = 0) is the status otherwise."""

    @functools.wraps(run)
    def main(argv=None) -> int:
        try:
            status = run(argv)
        except UserError as err:
            print(error_lines(err, prog), file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        return EXIT_OK if status is None else int(status)

    return main


@contextlib.contextmanager
def reported(prog: str | None = None, newline: bool = False) -> Iterator[None]:
    """Inside another program's process: a UserError raised in the block is printed as its
    `error:` line(s) at once and raised on, to end the process with status 2 and no traceback
    (a SystemExit with an integer code prints nothing more). `newline` starts the message on a
    fresh line (after a progress bar that left the cursor on its own)."""
    try:
        yield
    except UserError as err:
        print(("\n" if newline else "") + error_lines(err, prog), file=sys.stderr, flush=True)
        raise
