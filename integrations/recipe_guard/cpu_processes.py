"""Data-parallel training on CPUs (several processes, gloo), which Axolotl 0.19.0 does not set up.

Two things stand in the way when `axolotl train` runs as several processes without CUDA (torchrun
on a CPU machine, or as two "nodes" on one host):

- Axolotl's `normalize_config` pins every multi-process run's model to device `LOCAL_RANK`
  (`device_map = {"": 0}`), which torch reads as an accelerator that is not there: the model
  load fails ("Cannot access accelerator device when none is available");
- transformers' `TrainingArguments` sets up distributed training on CPUs only with
  `use_cpu=True`; without it each process trains alone on all the data, and the "data-parallel"
  run is N copies of one run.

Here, only when the run has several processes and no CUDA device, the device map becomes the
CPU and `ACCELERATE_USE_CPU=true` is set in the training process before accelerate's state is
first built (transformers reads it as `use_cpu`; accelerate then runs DDP over gloo).
"""

from __future__ import annotations

import os


def several_cpu_processes() -> bool:
    import torch

    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not torch.cuda.is_available()


def train_on_cpus() -> None:
    """For a multi-process CPU run: accelerate's CPU mode, and axolotl.cli.config's
    normalize_config (called by load_cfg after the plugins are registered) wrapped so that the
    device map is the CPU."""
    import axolotl.cli.config as cli_config

    if several_cpu_processes():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    normalize = cli_config.normalize_config
    if getattr(normalize, "_recipe_guard_cpu", False):
        return

    def normalize_config(cfg):
        normalize(cfg)
        if several_cpu_processes():
            cfg.device_map = {"": "cpu"}

    normalize_config._recipe_guard_cpu = True
    cli_config.normalize_config = normalize_config
