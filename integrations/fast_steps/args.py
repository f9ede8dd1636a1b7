"""Options of integrations.fast_steps (each on by default once the plugin is listed)."""

from __future__ import annotations

from pydantic import BaseModel

from integrations.options import switch


class FastStepsArgs(BaseModel):
    """Recipe keys of the fast-steps plugin; set one to false to measure or avoid its part."""

    fast_steps_packed_layout: bool = switch(
        "Read the packing layout (cu_seqlens) once per micro-batch instead of in every layer: "
        "needs attn_implementation sdpa, sample_packing and sdpa_varlen")
    fast_steps_bf16_lora: bool = switch(
        "Keep LoRA weights in bf16 with fp32 master copies in a fused AdamW: needs bf16 and "
        "optimizer adamw_torch_fused, not FSDP")
    fast_steps_gc_freeze: bool = switch(
        "Move everything loaded before training out of Python's garbage collector's scans "
        "(gc.freeze) so its collections, and Axolotl's gc.collect() at every epoch start, stay "
        "short")
