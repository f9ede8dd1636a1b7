"""Option of integrations.bf16_autocast."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Bf16AutocastArgs(BaseModel):
    """Recipe key of the bf16-autocast plugin."""

    bf16_autocast: Literal["auto", True, False] = Field(
        default="auto",
        json_schema_extra={"description": (
            "Train an fp32 recipe under bf16 autocast (weights, gradients and optimizer stay "
            "fp32; matrix products run in bf16). auto: where the hardware computes bf16 natively "
            "(a CPU with AVX512-BF16, AMX or Arm BF16 instructions; an NVIDIA GPU with bf16), "
            "else fp32; true: always; false: never")})
