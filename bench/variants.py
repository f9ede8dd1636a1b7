"""Named benchmark configurations: the notebook baseline, the recipe, and overrides on the recipe.

Each entry is `kind` ("notebook": bench.notebook_baseline; "axolotl": the recipe through
`python -m axolotl.cli.train`; "eval": `python -m eval.perplexity` on the adapter that the
`recipe` run saved; "unsloth": bench.unsloth_peer) plus `args` (extra command-line arguments)
or `overrides` (merged into the recipe's YAML, or into `recipe`, a peer's own config file, when
given; a value of None deletes the key), and optionally its own `warmup` and `steps`. The pseudo-key `liger` switches the Liger plugin and its four kernels on or
off together; `fast_steps` adds or removes integrations.fast_steps. Pick with `python -m bench.train_throughput --variants a,b,c`; the order given
is the order run (and the order a time budget cuts from the end).
"""

from __future__ import annotations

LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
FAST_STEPS_PLUGIN = "integrations.fast_steps.FastStepsPlugin"
LIGER_FLAGS = ("liger_rms_norm", "liger_glu_activation", "liger_rope",
               "liger_fused_linear_cross_entropy")
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
LIGER_IN_LAYERS = ("liger_rms_norm", "liger_glu_activation", "liger_rope")
COMPILE = {"fast_steps": True, "fast_steps_compile": True, **dict.fromkeys(LORA_KERNELS, False)}
CUDA_GRAPHS = {"fast_steps": True, "fast_steps_cuda_graphs": True}

VARIANTS: dict[str, dict] = {
    # -- the original notebook's method ---------------------------------------------------
    "notebook": {"kind": "notebook", "args": [],
                 "about": "notebook method: 4-bit nf4 dq, fp16, LoRA r32 q/v, 2 padded rows, "
                          "grad ckpt, paged AdamW 8-bit"},
    "notebook_bf16": {"kind": "notebook", "args": ["--compute-dtype", "bf16"],
                      "about": "notebook method with bf16 compute instead of fp16"},
    # -- scoring throughput of eval.perplexity, on the adapter the `recipe` run saved ----------
    "eval_ppl": {"kind": "eval", "args": ["--load-in-4bit"],
                 "about": "python -m eval.perplexity --compare on the recipe run's adapter "
                          "(4-bit base, then base + adapter)"},
    "eval_ppl_bf16": {"kind": "eval", "args": [],
                      "about": "python -m eval.perplexity --compare, bf16 base weights"},
    # -- the recipe as written ------------------------------------------------------------
    "recipe": {"kind": "axolotl", "overrides": {}, "about": "recipes/mistral-qlora.yml as is"},
    # -- memory/speed trade-offs ----------------------------------------------------------
    "ckpt": {"kind": "axolotl", "overrides": {"gradient_checkpointing": True},
             "about": "gradient checkpointing on"},
    "no_ckpt": {"kind": "axolotl", "overrides": {"gradient_checkpointing": False},
                "about": "gradient checkpointing off (fast, ~5x the memory)"},
    "offload": {"kind": "axolotl", "overrides": {"gradient_checkpointing": "offload"},
                "about": "checkpointed activations offloaded to CPU"},
    "liger": {"kind": "axolotl", "overrides": {"liger": True},
              "about": "Liger: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy"},
    "no_liger": {"kind": "axolotl", "overrides": {"liger": False}, "about": "Liger off"},
    "no_ckpt_liger": {"kind": "axolotl",
                      "overrides": {"gradient_checkpointing": False, "liger": True},
                      "about": "speed profile: no grad ckpt, Liger on"},
    "ckpt_liger": {"kind": "axolotl",
                   "overrides": {"gradient_checkpointing": True, "liger": True},
                   "about": "memory profile: grad ckpt + Liger"},
    "lean": {"kind": "axolotl",
             "overrides": {"gradient_checkpointing": True, "liger": True, "sequence_len": 2048,
                           "micro_batch_size": 1},
             "about": "least memory: grad ckpt + Liger, 1 x 2048 packed"},
    "example_like": {"kind": "axolotl",
                     "overrides": {"gradient_checkpointing": True, "liger": False,
                                   "sdpa_varlen": None, "overrides_of_model_config": None,
                                   "micro_batch_size": 2},
                     "about": "axolotl's examples/mistral/qlora.yml-like: grad ckpt, 2 x 4096, "
                              "sdpa with the 4-D mask, no Liger"},
    "ckpt_mbs2": {"kind": "axolotl",
                  "overrides": {"gradient_checkpointing": True, "micro_batch_size": 2},
                  "about": "the recipe with grad ckpt at 2 x 4096: least memory per token"},
    "ga1": {"kind": "axolotl", "overrides": {"gradient_accumulation_steps": 1},
            "about": "an optimizer step after every micro-batch"},
    "ga4": {"kind": "axolotl", "overrides": {"gradient_accumulation_steps": 4},
            "about": "4 micro-batches per optimizer step"},
    "fused_adamw": {"kind": "axolotl", "overrides": {"optimizer": "adamw_torch_fused"},
                    "about": "torch's fused AdamW (fp32 state) instead of paged 8-bit AdamW"},
    "ga2": {"kind": "axolotl", "overrides": {"gradient_accumulation_steps": 2},
            "about": "2 micro-batches per optimizer step (the tokens per step of 2-GPU DDP)"},
    # -- host-side work per step: each reverts one part of the recipe -------------------------
    "no_bf16_lora": {"kind": "axolotl", "overrides": {"fast_steps": True, "fast_steps_bf16_lora": False},
                     "about": "fp32 LoRA weights (cast to bf16 in every micro-batch), fused "
                              "AdamW on them directly"},
    "no_packed_layout": {"kind": "axolotl", "overrides": {"fast_steps": True, "fast_steps_packed_layout": False},
                         "about": "Axolotl's varlen attention as is: the packing layout "
                                  "recomputed, with GPU synchronisations, in every layer"},
    "no_gc_freeze": {"kind": "axolotl", "overrides": {"fast_steps": True, "fast_steps_gc_freeze": False},
                     "about": "Python's garbage collector scans everything loaded, at every "
                              "collection"},
    "bnb_paged_adamw": {"kind": "axolotl",
                        "overrides": {"optimizer": "paged_adamw_8bit", "fast_steps": True,
                                      "fast_steps_bf16_lora": False},
                        "about": "bitsandbytes' paged 8-bit AdamW on fp32 LoRA weights (it "
                                 "synchronises the GPU after every tensor)"},
    "default_dataloader": {"kind": "axolotl",
                           "overrides": {"dataset_num_proc": None,
                                         "dataloader_num_workers": None},
                           "about": "Axolotl's default data loading: a worker process and a "
                                    "process pool for packing, both re-forked every epoch"},
    "previous_recipe": {"kind": "axolotl",
                        "overrides": {"fast_steps": False, "optimizer": "paged_adamw_8bit",
                                      "dataset_num_proc": None,
                                      "dataloader_num_workers": None},
                        "about": "the recipe before the host-side work was cut (no fast_steps "
                                 "plugin, paged 8-bit AdamW, default data loading)"},
    # -- batch shape ----------------------------------------------------------------------
    "mbs1": {"kind": "axolotl", "overrides": {"micro_batch_size": 1},
             "about": "micro-batch 1"},
    "mbs2": {"kind": "axolotl", "overrides": {"micro_batch_size": 2},
             "about": "micro-batch 2"},
    "mbs4": {"kind": "axolotl", "overrides": {"micro_batch_size": 4},
             "about": "micro-batch 4 (more tokens per 4-bit dequantisation)"},
    "seq2048_mbs4": {"kind": "axolotl",
                     "overrides": {"sequence_len": 2048, "micro_batch_size": 4},
                     "about": "4 x 2048 packed (same tokens per step as 2 x 4096)"},
    "seq3584": {"kind": "axolotl", "overrides": {"sequence_len": 3584},
                "about": "1 x 3584 packed"},
    "seq3072": {"kind": "axolotl", "overrides": {"sequence_len": 3072},
                "about": "1 x 3072 packed"},
    "seq8192_mbs1": {"kind": "axolotl",
                     "overrides": {"sequence_len": 8192, "micro_batch_size": 1},
                     "about": "1 x 8192 packed"},
    # -- attention ------------------------------------------------------------------------
    "varlen": {"kind": "axolotl",
               "overrides": {"attn_implementation": "sdpa", "sdpa_varlen": True,
                             "overrides_of_model_config": {"sliding_window": None}},
               "about": "sdpa varlen (cu_seqlens: no cross-document attention work); needs "
                        "the 4096 sliding window dropped, a no-op at sequence_len <= 4096"},
    "liger_varlen": {"kind": "axolotl",
                     "overrides": {"liger": True, "attn_implementation": "sdpa",
                                   "sdpa_varlen": True,
                                   "overrides_of_model_config": {"sliding_window": None}},
                     "about": "Liger + sdpa varlen together"},
    "sdpa_mask": {"kind": "axolotl",
                  "overrides": {"attn_implementation": "sdpa", "sdpa_varlen": False},
                  "about": "sdpa with the explicit block-diagonal mask"},
    "flex": {"kind": "axolotl", "overrides": {"attn_implementation": "flex_attention"},
             "about": "flex attention (compiles its kernel on the first step)"},
    # -- LoRA -----------------------------------------------------------------------------
    "lora_kernels": {"kind": "axolotl",
                     "overrides": {**dict.fromkeys(LORA_KERNELS, True), "lora_dropout": 0.0},
                     "about": "axolotl's Triton LoRA kernels (lora_dropout 0)"},
    "no_lora_kernels": {"kind": "axolotl", "overrides": dict.fromkeys(LORA_KERNELS, False),
                        "about": "axolotl's Triton LoRA kernels off"},
    "qv_only": {"kind": "axolotl",
                "overrides": {"lora_target_linear": False,
                              "lora_target_modules": ["q_proj", "v_proj"]},
                "about": "LoRA on q_proj/v_proj only (the notebook's targets)"},
    # -- compiler -------------------------------------------------------------------------
    "torch_compile": {"kind": "axolotl", "overrides": {"torch_compile": True},
                      "about": "Axolotl's torch_compile: true (the whole model; compile time "
                               "lands in the warm-up steps)"},
    "compile": {"kind": "axolotl", "overrides": COMPILE,
                "about": "fast_steps_compile: decoder layers compiled (Axolotl's LoRA kernels "
                         "off, Liger on)"},
    "compile_no_liger_layers": {"kind": "axolotl",
                                "overrides": {**COMPILE, **dict.fromkeys(LIGER_IN_LAYERS, None)},
                                "about": "fast_steps_compile with Liger's in-layer kernels off "
                                         "(Inductor fuses norms, RoPE, SwiGLU; Liger's fused "
                                         "cross-entropy kept)"},
    "compile_cudagraphs": {"kind": "axolotl",
                           "overrides": {**COMPILE, "fast_steps_compile_mode": "reduce-overhead"},
                           "about": "fast_steps_compile with CUDA graphs (reduce-overhead)"},
    # -- low memory: a card of 8 GB -------------------------------------------------------
    "lowmem_ckpt": {"kind": "axolotl", "overrides": {"gradient_checkpointing": True},
                    "about": "the recipe with gradient checkpointing (1 x 4096)"},
    "lowmem_ckpt_kept_grads": {"kind": "axolotl",
                               "overrides": {"gradient_checkpointing": True, "fast_steps": True,
                                             "fast_steps_free_master_grads": False},
                               "about": "gradient checkpointing, the fp32 gradient copies kept "
                                        "between steps (as before fast_steps_free_master_grads)"},
    "lowmem_ckpt_compile": {"kind": "axolotl",
                            "overrides": {**COMPILE, "gradient_checkpointing": True},
                            "about": "gradient checkpointing + compiled decoder layers"},
    "lowmem_ckpt_8bit": {"kind": "axolotl",
                         "overrides": {"gradient_checkpointing": True,
                                       "optimizer": "paged_adamw_8bit", "fast_steps": True,
                                       "fast_steps_bf16_lora": False},
                         "about": "gradient checkpointing, bitsandbytes' paged 8-bit AdamW on "
                                  "fp32 LoRA weights (0.5 GiB less optimizer state)"},
    "recipe_8gb": {"kind": "axolotl", "recipe": "recipes/mistral-qlora-8gb.yml", "overrides": {},
                   "about": "recipes/mistral-qlora-8gb.yml as shipped (gradient checkpointing, "
                            "paged 8-bit AdamW on fp32 LoRA weights)"},
    "fused_qkv": {"kind": "axolotl", "overrides": {"fast_steps": True, "fast_steps_fused_lora_qkv": True},
                  "about": "fast_steps_fused_lora_qkv: the Q/K/V LoRA products shared across "
                           "the three projections (8 fewer kernels per layer)"},
    "fp8_base": {"kind": "axolotl", "overrides": {"fast_steps": True, "fast_steps_fp8_base": "cached"},
                 "about": "fast_steps_fp8_base: cached: the base products in FP8 from e4m3 "
                          "weights cast once (4-bit storage released)"},
    "fp8_base_per_step": {"kind": "axolotl",
                          "overrides": {"fast_steps": True, "fast_steps_fp8_base": "per_step"},
                          "about": "fast_steps_fp8_base: per_step: the base products in FP8, "
                                   "weights dequantised from 4 bits at every use"},
    "cuda_graphs_fp8": {"kind": "axolotl", "overrides": {**CUDA_GRAPHS, "fast_steps_fp8_base": "cached"},
                        "about": "fast_steps_cuda_graphs + fast_steps_fp8_base: cached"},
    "no_lean_walks": {"kind": "axolotl",
                      "overrides": {"fast_steps": True, "fast_steps_lean_walks": False},
                      "about": "fast_steps_lean_walks off: the Trainer walks the module tree "
                               "five times per step, as before"},
    "cuda_graphs_fp8_no_lean": {"kind": "axolotl",
                                "overrides": {**CUDA_GRAPHS, "fast_steps_fp8_base": "cached",
                                              "fast_steps_lean_walks": False},
                                "about": "cuda_graphs_fp8 with fast_steps_lean_walks off"},
    "cuda_graphs": {"kind": "axolotl", "overrides": CUDA_GRAPHS,
                    "about": "fast_steps_cuda_graphs: the decoder stack's forward and backward "
                             "replayed as two CUDA graphs"},
    "cuda_graphs_fused_qkv": {"kind": "axolotl",
                              "overrides": {**CUDA_GRAPHS, "fast_steps_fused_lora_qkv": True},
                              "about": "fast_steps_cuda_graphs with fast_steps_fused_lora_qkv"},
    "packed_gqa": {"kind": "axolotl", "overrides": {"fast_steps": True, "fast_steps_packed_gqa": True},
                   "about": "fast_steps_packed_gqa: K/V to the varlen kernel with their own 8 heads, "
                            "not repeated to 32"},
    "cuda_graphs_gqa": {"kind": "axolotl",
                        "overrides": {**CUDA_GRAPHS, "fast_steps_packed_gqa": True},
                        "about": "fast_steps_cuda_graphs with fast_steps_packed_gqa"},
    "recipe_8gb_unpaged": {"kind": "axolotl", "recipe": "recipes/mistral-qlora-8gb.yml",
                           "overrides": {"optimizer": "adamw_bnb_8bit"},
                           "about": "recipes/mistral-qlora-8gb.yml with bitsandbytes' 8-bit AdamW "
                                    "in device memory instead of paged (unified) memory"},
    "lowmem_offload": {"kind": "axolotl", "overrides": {"gradient_checkpointing": "offload"},
                       "about": "checkpointed layer inputs offloaded to CPU memory"},
    # -- peers a user could run instead ---------------------------------------------------
    "axolotl_example": {"kind": "axolotl", "recipe": "bench/peers/axolotl-example-mistral-qlora.yml",
                        "overrides": {}, "warmup": 2, "steps": 3,
                        "about": "Axolotl's examples/mistral/qlora.yml as shipped (2 x 8192 "
                                 "packed, 4 accumulated, grad ckpt, 8-bit AdamW; sdpa)"},
    "unsloth": {"kind": "unsloth", "args": ["--gradient-checkpointing", "false"],
                "about": "Unsloth FastLanguageModel 4-bit, LoRA r32 all 7, TRL SFT packing "
                         "4096, no gradient checkpointing"},
    "unsloth_ckpt": {"kind": "unsloth", "args": ["--gradient-checkpointing", "unsloth"],
                     "about": "the same with Unsloth's default gradient checkpointing "
                              "(\"unsloth\": offloaded)"},
}

# The notebook's method and the recipe, then each of the recipe's speed settings reverted one at a
# time (what moved the number, recipes/README.md). A time budget drops them from the end.
DEFAULT_VARIANTS = ("notebook", "recipe", "previous_recipe", "no_bf16_lora", "no_gc_freeze",
                    "no_packed_layout", "default_dataloader", "bnb_paged_adamw")


def expand_overrides(overrides: dict, recipe_plugins: list[str]) -> tuple[dict, list[str]]:
    """Resolve the `liger` and `fast_steps` pseudo-keys into config keys and plugins."""
    overrides = dict(overrides)
    plugins = list(recipe_plugins)
    fast = overrides.pop("fast_steps", None)
    if fast is True and FAST_STEPS_PLUGIN not in plugins:
        plugins.append(FAST_STEPS_PLUGIN)
    elif fast is False:
        plugins = [p for p in plugins if p != FAST_STEPS_PLUGIN]
        overrides.update({k: None for k in ("fast_steps_packed_layout", "fast_steps_bf16_lora",
                                            "fast_steps_free_master_grads",
                                            "fast_steps_gc_freeze",
                                            "fast_steps_dataset_save_in_process",
                                            "fast_steps_compile", "fast_steps_compile_mode")})
    liger = overrides.pop("liger", None)
    if liger is True:
        if LIGER_PLUGIN not in plugins:
            plugins.append(LIGER_PLUGIN)
        overrides.update(dict.fromkeys(LIGER_FLAGS, True))
    elif liger is False:
        plugins = [p for p in plugins if p != LIGER_PLUGIN]
        overrides.update(dict.fromkeys(LIGER_FLAGS, None))
    return overrides, plugins
