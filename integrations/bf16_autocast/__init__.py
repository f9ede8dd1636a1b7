"""bf16 autocast for fp32 recipes where the hardware computes bf16 natively: see README.md."""

from integrations.bf16_autocast.args import Bf16AutocastArgs
from integrations.bf16_autocast.plugin import Bf16AutocastPlugin, cpu_bf16_instructions, decide

__all__ = ["Bf16AutocastArgs", "Bf16AutocastPlugin", "cpu_bf16_instructions", "decide"]
