"""Axolotl plugin that records per-step throughput, loss and peak GPU memory as JSON lines.

Add to a config (the repo root must be importable, e.g. `PYTHONPATH=$PWD`):

    plugins:
      - bench.axolotl_plugin.ThroughputPlugin

and set `BENCH_STEPS_JSONL=/path/steps.jsonl` in the environment; each rank writes
`/path/steps.rank<r>.jsonl` (format: bench/step_recorder.py). Without the variable the plugin
only logs a warning, so a config that lists it still trains normally.
"""

from __future__ import annotations

import os

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from bench.common import ENV_STEPS_PATH
from bench.flops import DecoderShape
from bench.step_recorder import StepRecorder

LOG = get_logger(__name__)


class ThroughputPlugin(BasePlugin):
    """Attaches a `StepRecorder` to axolotl's trainer once it exists."""

    def post_trainer_create(self, cfg, trainer):
        out_path = os.environ.get(ENV_STEPS_PATH)
        if not out_path:
            LOG.warning("ThroughputPlugin: %s is not set; recording nothing", ENV_STEPS_PATH)
            return
        model = trainer.model
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "hidden_size"):
            config = model.get_base_model().config
        recorder = StepRecorder(
            out_path,
            shape=DecoderShape.from_config(config),
            gradient_checkpointing=bool(cfg.gradient_checkpointing),
            label=os.environ.get("BENCH_LABEL", ""),
        ).attach(trainer)
        LOG.info("ThroughputPlugin: writing per-step records to %s", recorder.out_path)
