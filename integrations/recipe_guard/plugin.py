"""Axolotl plugin: pre-flight checks, a finite-loss stop, and exact, robust resume.

    plugins:
      - integrations.recipe_guard.RecipeGuardPlugin

Axolotl calls `register()` before it validates the config, so `axolotl train recipes/x.yml`
stops with one clear line per problem (checks.py) instead of a traceback wall, and first
checks that the Axolotl internals the fixes below patch are the ones they were written for
(`check_patch_targets`, with compat.py). Then, each an option of args.py (all on by default):
- `recipe_guard_seed_lora`: `seed` also seeds the LoRA initialisation (`pre_lora_load`);
- `recipe_guard_exact_resume`: the packed order depends only on (seed, epoch) (resume.py);
- `recipe_guard_skip_incomplete_checkpoints`: auto-resume skips a checkpoint cut short
  (resume.py);
- `recipe_guard_one_line_save_errors`: a checkpoint save on a full disk is one line
  (saving.py);
- `recipe_guard_finite_loss`: training stops on a NaN/inf loss or grad norm (callbacks.py);
- `recipe_guard_stopped_run_fails`: a run Axolotl's loss watchdog stopped is recorded as stopped
  early and `axolotl train` fails with one line (stops.py); `axolotl merge-lora` of a run that
  stopped early stops in `register()` unless RECIPE_GUARD_ALLOW_STOPPED=1.
Every stop is one `error:` line on stderr and exit status 2 (core/errors.py).
"""

from __future__ import annotations

import sys

from core.errors import reported, stop_on
from integrations.recipe_guard.args import option
from integrations.recipe_guard.callbacks import FiniteLossCallback
from integrations.recipe_guard.checks import check_recipe
from integrations.recipe_guard.compat import patch_target
from integrations.recipe_guard.cpu_processes import train_on_cpus
from integrations.recipe_guard.resume import (
    RESUME_OPTION,
    RESUME_TARGET,
    SAMPLER_OPTION,
    SAMPLER_PARAMS,
    seed_packed_order,
    skip_incomplete_checkpoints,
)
from integrations.recipe_guard.saving import SAVE_OPTION, one_line_save_errors
from integrations.recipe_guard.stops import (
    STOP_OPTION,
    WatchdogStopCallback,
    find_watchdog,
    finish,
    refuse_stopped_merge,
    running_command,
)

try:  # the plugin base class only exists where axolotl is installed
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - the checks and the CLI work without it
    BasePlugin = object


def check_patch_targets(cfg) -> None:
    """Every patch target the recipe's enabled options need, on Axolotl's classes (before the
    model is loaded: a mismatch costs seconds, not a model load)."""
    from axolotl.core.trainers.base import AxolotlTrainer

    if option(cfg, SAVE_OPTION):
        patch_target(AxolotlTrainer, "_save_checkpoint", (), SAVE_OPTION)
    if option(cfg, SAMPLER_OPTION) and cfg.get("sample_packing"):
        patch_target(AxolotlTrainer, "_create_multipack_sampler", SAMPLER_PARAMS, SAMPLER_OPTION)
    if option(cfg, RESUME_OPTION):
        module, function = RESUME_TARGET
        patch_target(__import__(module, fromlist=[function]), function, ("cfg",), RESUME_OPTION)


def running_preprocess() -> bool:
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "preprocess" in sys.argv[:2] or (main_spec is not None and "preprocess" in main_spec.name)


class RecipeGuardPlugin(BasePlugin):
    """See the module docstring."""

    def get_input_args(self):
        return "integrations.recipe_guard.RecipeGuardArgs"

    def register(self, cfg):
        with reported():
            stop_on(check_recipe(dict(cfg), runtime=not running_preprocess()))
            check_patch_targets(cfg)
            if running_command("merge-lora"):
                refuse_stopped_merge(cfg)
        if option(cfg, "recipe_guard_cpu_processes"):
            train_on_cpus()

    def pre_lora_load(self, cfg, model):
        if option(cfg, "recipe_guard_seed_lora") and cfg.get("seed") is not None:
            from transformers import set_seed

            set_seed(cfg["seed"])

    def post_trainer_create(self, cfg, trainer):
        with reported():
            if option(cfg, SAVE_OPTION):
                one_line_save_errors(trainer)
            if option(cfg, SAMPLER_OPTION) and cfg.get("sample_packing"):
                seed = cfg.get("seed")
                seed_packed_order(trainer, trainer.args.seed if seed is None else seed)
            # Axolotl's auto-resume runs after this hook
            if option(cfg, "recipe_guard_skip_incomplete_checkpoints"):
                skip_incomplete_checkpoints(cfg)

    def add_callbacks_pre_trainer(self, cfg, model):
        return [FiniteLossCallback()] if option(cfg, "recipe_guard_finite_loss") else []

    def add_callbacks_post_trainer(self, cfg, trainer):
        # after Axolotl's own callbacks, its LossWatchDogCallback included
        self.watchdog_stop = None
        if option(cfg, STOP_OPTION) and cfg.get("loss_watchdog_threshold") is not None:
            with reported():
                self.watchdog_stop = WatchdogStopCallback(find_watchdog(trainer))
            return [self.watchdog_stop]
        return []

    def post_train_unload(self, cfg):
        # training finished and Axolotl saved everything: a watchdog stop fails here
        with reported():
            finish(cfg, getattr(self, "watchdog_stop", None))
