"""Options of integrations.recipe_guard (each on by default once the plugin is listed).

The pre-flight checks have no switch: they are what the plugin is for. Each fix of Axolotl's
behaviour can be turned off in a recipe, e.g. to compare with Axolotl's own behaviour.
"""

from __future__ import annotations

from pydantic import BaseModel

from integrations.options import enabled as option
from integrations.options import switch

__all__ = ["RecipeGuardArgs", "option"]


class RecipeGuardArgs(BaseModel):
    """Recipe keys of the recipe-guard plugin."""

    recipe_guard_finite_loss: bool = switch(
        "Stop training with one line, before anything is saved, as soon as the logged loss, "
        "grad norm or eval loss is NaN or infinite")
    recipe_guard_seed_lora: bool = switch(
        "Seed the LoRA initialisation with `seed` (Axolotl seeds only inside the Trainer, which "
        "is built after the adapter)")
    recipe_guard_exact_resume: bool = switch(
        "Packed batches in an order that depends only on (seed, epoch), so a resumed run skips "
        "exactly the batches it trained on (needs sample_packing)")
    recipe_guard_skip_incomplete_checkpoints: bool = switch(
        "On auto-resume, skip a newest checkpoint without a complete trainer_state.json (cut "
        "short by a kill or a full disk) for the newest complete one")
    recipe_guard_one_line_save_errors: bool = switch(
        "A checkpoint save that fails for lack of disk space stops with one line instead of a "
        "traceback; other errors keep theirs")
    recipe_guard_stopped_run_fails: bool = switch(
        "When the loss watchdog stops training, record it in output_dir/stopped_early.json and "
        "make `axolotl train` fail with one line (Axolotl exits 0 and saves the adapter as if "
        "it were trained); `axolotl merge-lora` of such a run stops unless "
        "RECIPE_GUARD_ALLOW_STOPPED=1")
    recipe_guard_cpu_processes: bool = switch(
        "Several training processes without CUDA (torchrun on CPUs) train data-parallel over "
        "gloo: the model placed on the CPU and the Trainer told to use it (Axolotl 0.19.0 "
        "places it on GPU LOCAL_RANK, and each process would train alone)")
