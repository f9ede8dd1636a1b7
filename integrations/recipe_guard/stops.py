"""A run that training stopped early is a failure, and says so.

Axolotl 0.19's loss watchdog (`loss_watchdog_threshold`, `loss_watchdog_patience`) stops
training when the logged loss stays above the threshold, then saves the adapter, prints
"Training completed! ... Model successfully saved" and exits 0: the next command (eval,
merge-lora, export) took that adapter for the trained one. With `recipe_guard_stopped_run_fails`
(on by default):

- `WatchdogStopCallback`, added after Axolotl's own `LossWatchDogCallback`, sees the step at
  which the watchdog stopped training and writes output_dir/stopped_early.json (core/runs.py:
  what crossed which threshold at which step, what to try). Training then ends as Axolotl ends
  it: the checkpoints stay, and the adapter as it was at the stop is saved.
- After Axolotl has saved everything (`post_train_unload`), `axolotl train` stops with one
  `error:` line saying so (exit status 2 in the training process, 1 from `axolotl train`'s
  launcher). A training that finishes without a stop removes an earlier stopped_early.json.
- The NaN/inf stop (callbacks.py) writes the same record before it ends training.
- `axolotl merge-lora` of a recipe whose output_dir holds the record stops in `register()` with
  one line, unless the environment sets RECIPE_GUARD_ALLOW_STOPPED=1. Our own commands take
  `--allow-stopped` (python -m eval, python -m export).
"""

from __future__ import annotations

import math
import os
import sys

from core.errors import UserError
from core.files import os_reason
from core.runs import STOPPED_EARLY_JSON, clear_stop_record, refuse_stopped, write_stop_record
from integrations.recipe_guard.compat import NAME, PINNED_AXOLOTL, axolotl_version

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the checks work without transformers
    TrainerCallback = object

STOP_OPTION = "recipe_guard_stopped_run_fails"
ALLOW_ENV = "RECIPE_GUARD_ALLOW_STOPPED"
WATCHDOG_ATTRIBUTES = ("threshold", "patience", "violations")
# what a model that has learned nothing scores: the loss of a uniform guess over the vocabulary
UNIFORM_LOSS_MARGIN = 0.5


def stop_line(summary: str, fix: str, output_dir) -> str:
    """The one line `axolotl train` ends with after a stop."""
    return (f"{summary}; {fix}. The checkpoints are kept in {output_dir}, and "
            f"{STOPPED_EARLY_JSON} there marks the run as stopped early")


def record_stop(args, state, *, reason: str, summary: str, fix: str) -> None:
    """Write the stop record (by the main process only) into the run's output_dir; a record
    that cannot be written (a full disk) is a warning, never in the way of the stop itself."""
    if not getattr(state, "is_world_process_zero", True):
        return
    try:
        write_stop_record(args.output_dir, reason=reason, step=state.global_step,
                          max_steps=getattr(state, "max_steps", None) or None, summary=summary,
                          fix=fix)
    except OSError as err:
        print(f"warning: cannot write {STOPPED_EARLY_JSON} in {args.output_dir} "
              f"({os_reason(err)}): the run is not marked as stopped early", file=sys.stderr)


def find_watchdog(trainer):
    """Axolotl's LossWatchDogCallback on the trainer, checked to be the one written against."""
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
    found = [cb for cb in callbacks if type(cb).__name__ == "LossWatchDogCallback"]
    version = axolotl_version()
    fix = f"pin axolotl=={PINNED_AXOLOTL} or set `{STOP_OPTION}: false`"
    if not found:
        raise UserError(f"{NAME}: the recipe sets loss_watchdog_threshold but axolotl {version} "
                        f"put no LossWatchDogCallback on the trainer, which `{STOP_OPTION}` "
                        f"watches (written against axolotl {PINNED_AXOLOTL}): {fix}")
    missing = [a for a in WATCHDOG_ATTRIBUTES if not hasattr(found[0], a)]
    if missing:
        raise UserError(f"{NAME}: LossWatchDogCallback of axolotl {version} has no "
                        f"{', '.join(missing)}, which `{STOP_OPTION}` reads (written against "
                        f"axolotl {PINNED_AXOLOTL}): {fix}")
    return found[0]


class WatchdogStopCallback(TrainerCallback):
    """Runs after Axolotl's LossWatchDogCallback (a post-trainer callback): when the watchdog
    has just stopped training, records why (see the module docstring)."""

    def __init__(self, watchdog):
        self.watchdog = watchdog
        self.line: str | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        dog = self.watchdog
        if self.line is None and control.should_training_stop and \
                dog.violations >= dog.patience:
            logged = next((row for row in reversed(state.log_history) if "loss" in row), {})
            loss, at = logged.get("loss"), logged.get("step", state.global_step)
            of = f" of {state.max_steps}" if state.max_steps else ""
            summary = (f"the loss stayed above loss_watchdog_threshold {dog.threshold} for "
                       f"{dog.patience} steps in a row, {loss:.4f} at step {at}, so Axolotl's "
                       f"loss watchdog stopped training at step {state.global_step}{of}")
            fix = ("lower learning_rate or check the data (or raise loss_watchdog_threshold if "
                   "the loss is meant to start that high) and train again")
            uniform = uniform_loss(model)
            if uniform and isinstance(loss, float) and \
                    abs(loss - uniform[1]) < UNIFORM_LOSS_MARGIN:
                fix = (f"{loss:.2f} is about ln({uniform[0]}) = {uniform[1]:.2f}, the loss of a "
                       "model that has learned nothing: check that base_model is a pretrained "
                       "model (for a random-init one, remove loss_watchdog_threshold or set it "
                       f"above {uniform[1]:.1f}) and train again")
            record_stop(args, state, reason="loss_watchdog", summary=summary, fix=fix)
            self.line = stop_line(summary, fix, args.output_dir)
        return control


def uniform_loss(model) -> tuple[int, float] | None:
    """(vocabulary size, ln of it) of the model being trained, if it can be told."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None) or getattr(
        getattr(config, "text_config", None), "vocab_size", None)
    return (size, math.log(size)) if isinstance(size, int) and size > 1 else None


def finish(cfg, watchdog_stop: WatchdogStopCallback | None) -> None:
    """After training and saving: fail with the stop's line, else drop the stop record an
    earlier training of the same output_dir left (this one finished)."""
    if watchdog_stop is not None and watchdog_stop.line:
        raise UserError(watchdog_stop.line)
    if cfg.get("output_dir") and int(os.environ.get("RANK", "0")) == 0:
        clear_stop_record(cfg["output_dir"])


def running_command(name: str) -> bool:
    """True in `axolotl NAME ...` and `python -m axolotl.cli.NAME ...` (with - as _)."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = f"axolotl.cli.{name.replace('-', '_')}"
    return name in sys.argv[1:2] or (main_spec is not None and main_spec.name == module)


def refuse_stopped_merge(cfg) -> None:
    """`axolotl merge-lora` of a run that stopped early: one line, unless the environment sets
    RECIPE_GUARD_ALLOW_STOPPED=1."""
    if os.environ.get(ALLOW_ENV, "").lower() in ("1", "true", "yes", "on"):
        return
    output_dir = cfg.get("lora_model_dir") or cfg.get("output_dir")
    if output_dir:
        refuse_stopped(output_dir, f"set {ALLOW_ENV}=1")
