"""A checkpoint save that fails for lack of disk space stops with one line.

Without this, a full disk (or a file-size limit) while the Trainer saves a checkpoint ends in a
traceback through transformers, peft and safetensors. `one_line_save_errors` wraps the
trainer's `_save_checkpoint`: a disk error becomes one `error:` line (exit status 2) saying
what to do; the partial checkpoint it leaves has no trainer_state.json, so the next run resumes
from the one before (resume.py). Every other error (CUDA, NCCL, a state-dict mismatch, a
permission) propagates unchanged, with its own traceback.

Disk errors, identified precisely:
- OSError with errno ENOSPC (disk full), EDQUOT (quota) or EFBIG (file-size limit), anywhere in
  the exception's chain (JSON and config files written with open());
- safetensors' SafetensorError carrying one of those codes ("I/O error: No space left on device
  (os error 28)": the adapter weights);
- torch.save's short-write failure of its zip writer ("[enforce fail at inline_container.cc]
  ... unexpected pos N vs M" / "file write failed": the optimizer and scheduler state).
"""

from __future__ import annotations

import errno
import functools
import re

from core.errors import UserError, exception_chain, first_line, reported
from integrations.recipe_guard.compat import patch_target

SAVE_OPTION = "recipe_guard_one_line_save_errors"
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # Rust's io::Error text, in safetensors'
_TORCH_SHORT_WRITE = re.compile(
    r"inline_container\.cc.*(unexpected pos \d+ vs \d+|file write failed)|"
    r"PytorchStreamWriter failed writing file")


def disk_error_reason(err: BaseException) -> str | None:
    """The short reason when `err` is a write that failed for lack of space (see above), else
    None."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - transformers always brings safetensors
        SafetensorError = ()  # noqa: N806
    for e in exception_chain(err):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e.strerror or first_line(e)
        if SafetensorError and isinstance(e, SafetensorError):
            code = _OS_ERROR_CODE.search(str(e))
            if code and int(code[1]) in DISK_ERRNOS:
                return first_line(e)
        if isinstance(e, RuntimeError) and _TORCH_SHORT_WRITE.search(str(e)):
            return first_line(e)
    return None


def one_line_save_errors(trainer) -> None:
    """Wrap `trainer._save_checkpoint` as described above (idempotent)."""
    save = patch_target(trainer, "_save_checkpoint", (), SAVE_OPTION)
    if getattr(save, "_recipe_guard_saving", False):
        return

    @functools.wraps(save)
    def guarded_save(*args, **kwargs):
        try:
            return save(*args, **kwargs)
        except Exception as err:
            reason = disk_error_reason(err)
            if reason is None:
                raise  # not a disk error: its own traceback
        with reported(newline=True):  # newline: tqdm leaves the cursor after its bar
            raise UserError(
                f"saving checkpoint-{trainer.state.global_step} in {trainer.args.output_dir} "
                f"failed ({reason}); if the disk is full, free space and re-run the same "
                "command: it resumes from the newest complete checkpoint")

    guarded_save._recipe_guard_saving = True
    trainer._save_checkpoint = guarded_save
