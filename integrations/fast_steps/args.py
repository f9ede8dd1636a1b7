"""Options of integrations.fast_steps (each on by default once the plugin is listed)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from integrations.options import switch


class FastStepsArgs(BaseModel):
    """Recipe keys of the fast-steps plugin; set one to false to measure or avoid its part."""

    fast_steps_packed_layout: bool = switch(
        "Read the packing layout (cu_seqlens) once per micro-batch instead of in every layer: "
        "needs attn_implementation sdpa, sample_packing and sdpa_varlen")
    fast_steps_packed_gqa: bool = Field(
        default=False, json_schema_extra={"description": (
            "With fast_steps_packed_layout: grouped-query K/V passed to the varlen kernel as "
            "they are (torch's enable_gqa), not repeated to the query heads: less memory kept "
            "for the backward pass, fewer copies; needs a torch whose varlen_attn takes "
            "enable_gqa")})
    fast_steps_bf16_lora: bool = switch(
        "Keep LoRA weights in bf16 with fp32 master copies in a fused AdamW: needs bf16 and "
        "optimizer adamw_torch_fused, not FSDP")
    fast_steps_free_master_grads: bool = switch(
        "With fast_steps_bf16_lora: free the fp32 copies of the gradients after each optimizer "
        "step, so the backward pass, where GPU memory peaks, does not hold them (0.31 GiB for "
        "Mistral-7B's LoRA weights; their memory is taken back at the next step)")
    fast_steps_gc_freeze: bool = switch(
        "Move everything loaded before training out of Python's garbage collector's scans "
        "(gc.freeze) so its collections, and Axolotl's gc.collect() at every epoch start, stay "
        "short")
    fast_steps_gc_freeze_imports: bool = switch(
        "Also freeze what the imports made, at config load: Axolotl's ~20 full collections "
        "while it packs the data and sets up the Trainer then skip those ~600k objects")
    fast_steps_lean_walks: bool = switch(
        "Walk the model's module tree once, not at every step: the Trainer's train(), "
        "unwrap_model, parameter count, gradient clipping and zero_grad each walk all ~2,700 "
        "modules of a QLoRA 7B in Python while the GPU waits (module_walks.py); not with "
        "FSDP or DeepSpeed, whose wrappers clip the gradients")
    fast_steps_dataset_save_in_process: bool = switch(
        "Save the prepared datasets from the training process when datasets would start a "
        "one-worker process pool for it (seconds per save at every first run of a recipe)")
    fast_steps_fused_lora_qkv: bool = Field(
        default=False, json_schema_extra={"description": (
            "Compute the Q, K and V projections' LoRA adapters with one product where Axolotl's "
            "lora_qkv_kernel makes three (fused_lora.py; same results, fewer kernel launches): "
            "needs lora_qkv_kernel on, no LoRA dropout")})
    fast_steps_compile: bool = Field(
        default=False, json_schema_extra={"description": (
            "torch.compile each decoder layer's training forward (one compilation shared by "
            "all layers; attention, evaluation and generation stay eager): needs Axolotl's "
            "LoRA kernels off (lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel: false)")})
    fast_steps_compile_mode: Literal["default", "max-autotune-no-cudagraphs",
                                     "reduce-overhead"] = Field(
        default="default", json_schema_extra={"description": (
            "torch.compile mode for fast_steps_compile (reduce-overhead adds CUDA graphs)")})
    fast_steps_cuda_graphs: bool = Field(
        default=False, json_schema_extra={"description": (
            "Replay the decoder stack's training forward and backward as two CUDA graphs, "
            "captured after the first step (cuda_graphs.py): needs a CUDA GPU, "
            "pad_to_sequence_len, gradient_accumulation_steps 1, no gradient checkpointing, "
            "fast_steps_packed_layout on, fast_steps_compile off")})
    fast_steps_fp8_base: Literal[False, "cached", "per_step"] = Field(
        default=False, json_schema_extra={"description": (
            "The frozen 4-bit base weights' matrix products in FP8 (e4m3, power-of-two "
            "scales; fp8_base.py): `cached` casts the weights to e4m3 once and releases their "
            "4-bit storage, `per_step` dequantises them at every use as before: needs a GPU "
            "with FP8 (compute capability 8.9+), load_in_4bit and Axolotl's three LoRA kernels "
            "on; changes the base model's arithmetic (compare the loss)")})
