"""Exact resume: the packed order of a resumed run, and checkpoints cut short.

1. Packed order. Axolotl packs an epoch's batches from an unseeded `RandomSampler` when the
   dataloader is built. A fresh run re-packs them at the epoch start from accelerate's seeded
   sampler, but after a resume the batches packed at setup were used (accelerate's
   batch-skipping wrapper does not pass `set_epoch` on), so skipping the N trained batches
   skipped unseen passages and repeated seen ones. `seed_packed_order` replaces the trainer's
   `_create_multipack_sampler` so the order is a function of (seed, epoch) whenever it is
   packed: the order a fresh run got before.
2. Incomplete checkpoints. The Trainer writes trainer_state.json last; a newest checkpoint
   without a readable one (killed while saving, or the disk filled) made every re-run crash
   ("Can't find a valid checkpoint" or FileNotFoundError) until the user deleted it.
   `skip_incomplete_checkpoints` points Axolotl's auto-resume, which runs after the trainer is
   created and honours `resume_from_checkpoint`, at the newest complete checkpoint instead.
"""

from __future__ import annotations

import functools
import inspect
import sys

from core.runs import newest_complete_checkpoint
from integrations.recipe_guard.compat import patch_target

SAMPLER_OPTION = "recipe_guard_exact_resume"
SAMPLER_PARAMS = ("base_sampler", "dataset")  # what the wrapper binds by name
RESUME_OPTION = "recipe_guard_skip_incomplete_checkpoints"
# Axolotl's auto-resume: takes cfg.resume_from_checkpoint when set, else the highest checkpoint
RESUME_TARGET = ("axolotl.utils.train", "determine_last_checkpoint")


class EpochSeededSampler:
    """A shuffled order of `size` items that depends only on (seed, epoch).

    Used as the base sampler of Axolotl's MultipackBatchSampler (`owner`), so the packed batches
    of an epoch are the same whenever they are generated: at the start of a fresh run, or after
    a resume, when the Trainer skips the batches the checkpoint already trained on.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.owner = size, seed, 0, None

    def set_epoch(self, epoch: int) -> None:
        # accelerate reaches this sampler through its SkipBatchSampler on resume, but not the
        # owner, whose cached batches would be another epoch's
        self.epoch = epoch
        if self.owner is not None and getattr(self.owner, "epoch", epoch) != epoch:
            self.owner.set_epoch(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.size, generator=generator).tolist()


def seed_packed_order(trainer, seed: int) -> None:
    """Make the trainer's multipack sampler shuffle with EpochSeededSampler (idempotent)."""
    from torch.utils.data import RandomSampler

    create = patch_target(trainer, "_create_multipack_sampler", SAMPLER_PARAMS, SAMPLER_OPTION)
    if getattr(create, "_recipe_guard_seeded", False):
        return
    signature = inspect.signature(create)

    @functools.wraps(create)
    def create_seeded(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        base_sampler, dataset = (bound.arguments[p] for p in SAMPLER_PARAMS)
        if not (isinstance(base_sampler, RandomSampler) and base_sampler.generator is None):
            return create(*args, **kwargs)  # sequential/curriculum or already seeded: as is
        order = EpochSeededSampler(len(dataset), seed)
        bound.arguments["base_sampler"] = order
        multipack = create(*bound.args, **bound.kwargs)
        order.owner = multipack
        return multipack

    create_seeded._recipe_guard_seeded = True
    trainer._create_multipack_sampler = create_seeded


def skip_incomplete_checkpoints(cfg) -> None:
    """Before Axolotl's auto-resume: a newest checkpoint without a complete trainer_state.json
    is skipped, with a warning, for the newest complete one (or the start)."""
    if not cfg.get("auto_resume_from_checkpoints") or cfg.get("resume_from_checkpoint"):
        return
    module, function = RESUME_TARGET
    patch_target(__import__(module, fromlist=[function]), function, ("cfg",), RESUME_OPTION)
    complete, incomplete = newest_complete_checkpoint(cfg["output_dir"])
    if not incomplete:
        return
    names = ", ".join(p.name for p in incomplete)
    print(f"warning: {names} in {cfg['output_dir']} has no complete trainer_state.json (the run "
          f"was killed, or the disk filled, while saving it); resuming from "
          f"{complete.name if complete else 'the start'} instead", file=sys.stderr)
    if complete is not None:
        cfg["resume_from_checkpoint"] = str(complete)
    else:
        cfg["auto_resume_from_checkpoints"] = False
