"""Less host-side (Python) work per training step: see README.md."""

from integrations.fast_steps.args import FastStepsArgs
from integrations.fast_steps.plugin import FastStepsPlugin

__all__ = ["FastStepsArgs", "FastStepsPlugin"]
