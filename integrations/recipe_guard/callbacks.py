"""Trainer callbacks of the recipe guard."""

from __future__ import annotations

import math

from core.errors import UserError, reported
from integrations.recipe_guard.stops import record_stop

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the checks work without transformers
    TrainerCallback = object


class FiniteLossCallback(TrainerCallback):
    """Stops training, before anything is saved, when a logged loss or grad norm is NaN/inf.

    Axolotl's loss watchdog only compares `loss > threshold`, which is False for NaN, and the
    run would exit 0 having saved the broken adapter. The run directory records the stop
    (stopped_early.json, stops.py).
    """

    WATCHED = ("loss", "grad_norm", "eval_loss")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.WATCHED:
            value = (logs or {}).get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                record_stop(args, state, reason="non_finite",
                            summary=f"{key} became {value} at step {state.global_step}",
                            fix="lower learning_rate (or check the data) and train again")
                with reported(newline=True):  # newline: tqdm leaves the cursor after its bar
                    raise UserError(
                        f"{key} became {value} at step {state.global_step}; training stopped "
                        "before saving. Lower learning_rate (or check the data) and re-run; the "
                        f"last good checkpoint, if any, is in {args.output_dir}")
        return control
