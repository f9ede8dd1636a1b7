"""Axolotl plugin: less host-side (Python) work per training step.

    plugins:
      - integrations.fast_steps.FastStepsPlugin

A QLoRA step of a 7B model on one fast GPU is bound by the Python that launches its kernels,
not by the GPU, and its start-up by what runs before the first step. Each part is an option
in args.py (on by default unless said):
- packed layout: Axolotl's varlen attention reads the packing layout once per micro-batch
  instead of in every layer (packed_layout.py);
- bf16 LoRA: LoRA weights in bf16 with fp32 masters in a fused AdamW (master_weights.py);
- gc freeze: what was loaded before training is left out of the garbage collector's scans
  (and, from config load on, what the imports made);
- dataset save in process: the prepared datasets saved without a one-worker process pool;
- lean walks: the Trainer's per-step walks over the module tree (train(), unwrap_model, the
  parameter count, gradient clipping, zero_grad) each done once (module_walks.py);
- packed GQA (off by default): the packed attention takes grouped-query K/V with their own
  heads instead of repeated to the query heads (packed_layout.py);
- fused LoRA QKV (off by default): the three attention projections' adapters computed with
  shared products instead of one by one (fused_lora.py);
- compile (off by default): each decoder layer's training forward compiled (compiled_layers.py);
- CUDA graphs (off by default): the decoder stack's training forward and backward replayed as
  two CUDA graphs (cuda_graphs.py);
- FP8 base products (off by default): the frozen 4-bit weights' matrix products on FP8 tensor
  cores (fp8_base.py).

Each part checks at start-up that what it replaces is there (Axolotl's varlen attention
wrapper; the recipe settings it needs) and stops with one line otherwise (one `error:` line and
exit status 2, core/errors.py).
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from core.errors import UserError, reported, stop_on
from core.files import write_json
from core.pins import pinned
from integrations.fast_steps.compiled_layers import CompiledLayers, compile_report
from integrations.fast_steps.cuda_graphs import GraphedStack
from integrations.fast_steps.dataset_save import save_in_process
from integrations.fast_steps.fp8_base import install_fp8_base
from integrations.fast_steps.fused_lora import install_fused_qkv
from integrations.fast_steps.master_weights import MasterWeightAdamW, cast_trainable_to_bf16
from integrations.fast_steps.module_walks import install_lean_walks
from integrations.fast_steps.packed_layout import (
    LayoutCache,
    make_packed_sdpa,
    varlen_takes_gqa,
)
from integrations.options import enabled as option

try:  # the plugin base class only exists where axolotl is installed
    from axolotl.integrations.base import BasePlugin
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    BasePlugin = TrainerCallback = object

LOG = logging.getLogger(__name__)
NAME = "integrations.fast_steps.FastStepsPlugin"
# Axolotl's sdpa_varlen wrapper keeps the stock function under this attribute
# (axolotl/monkeypatch/attention/sdpa_varlen.py in the pinned axolotl)
AXOLOTL_ORIGINAL_ATTR = "_axolotl_sdpa_original"
LAYOUTS = LayoutCache()
COMPILE_REPORT = "fast_steps_compile.json"
CUDA_GRAPHS_REPORT = "fast_steps_cuda_graphs.json"
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def training(cfg) -> bool:
    """False under `axolotl merge-lora` / `axolotl inference`: they load the recipe with their own
    overrides (merge-lora clears `attn_implementation`) and never take a training step, so there
    is nothing for this plugin to check or change."""
    return not (cfg.get("merge_lora") or cfg.get("inference"))


def settings_problems(cfg) -> list[str]:
    """What in the recipe contradicts an enabled part (one line each, with the fix)."""
    problems = []
    if not training(cfg):
        return problems
    if option(cfg, "fast_steps_packed_layout"):
        wanted = {"attn_implementation": "sdpa", "sample_packing": True, "sdpa_varlen": True}
        wrong = [f"`{k}: {str(v).lower()}`" for k, v in wanted.items() if cfg.get(k) != v]
        if wrong:
            problems.append(f"{NAME}: fast_steps_packed_layout needs {', '.join(wrong)} "
                            "(or set `fast_steps_packed_layout: false`)")
    if option(cfg, "fast_steps_lean_walks") and sharded(cfg):
        problems.append(f"{NAME}: fast_steps_lean_walks clips the gradients as one process or "
                        "DDP does; FSDP/DeepSpeed clip through their wrappers: set "
                        "`fast_steps_lean_walks: false`")
    if option(cfg, "fast_steps_bf16_lora"):
        if cfg.get("optimizer") != "adamw_torch_fused":
            problems.append(f"{NAME}: fast_steps_bf16_lora trains with its own fused AdamW: set "
                            "`optimizer: adamw_torch_fused` (or `fast_steps_bf16_lora: false`)")
        if sharded(cfg):
            problems.append(f"{NAME}: fast_steps_bf16_lora does not support FSDP/DeepSpeed: "
                            "set `fast_steps_bf16_lora: false`")
    if cfg.get("fast_steps_packed_gqa") and not option(cfg, "fast_steps_packed_layout"):
        problems.append(f"{NAME}: fast_steps_packed_gqa is part of fast_steps_packed_layout: "
                        "remove `fast_steps_packed_layout: false` (or set "
                        "`fast_steps_packed_gqa: false`)")
    if cfg.get("fast_steps_fused_lora_qkv"):
        if cfg.get("lora_qkv_kernel") is False:
            problems.append(f"{NAME}: fast_steps_fused_lora_qkv replaces Axolotl's LoRA QKV "
                            "kernel: remove `lora_qkv_kernel: false` (or set "
                            "`fast_steps_fused_lora_qkv: false`)")
        if cfg.get("lora_dropout"):
            problems.append(f"{NAME}: fast_steps_fused_lora_qkv needs `lora_dropout: 0` (or set "
                            "`fast_steps_fused_lora_qkv: false`)")
    if cfg.get("fast_steps_compile"):
        on = [k for k in LORA_KERNEL_KEYS if cfg.get(k) is not False]
        if on:  # Axolotl turns an absent kernel key on for LoRA recipes
            problems.append(
                f"{NAME}: fast_steps_compile needs {', '.join(f'`{k}: false`' for k in on)} "
                "(Axolotl's LoRA kernels call bitsandbytes through ctypes, which torch.compile "
                "cannot trace)")
        if cfg.get("torch_compile"):
            problems.append(f"{NAME}: fast_steps_compile compiles the decoder layers itself: "
                            "remove `torch_compile: true` (or set `fast_steps_compile: false`)")
    if cfg.get("fast_steps_cuda_graphs"):
        problems += cuda_graph_problems(cfg)
    if cfg.get("fast_steps_fp8_base"):
        problems += fp8_problems(cfg)
    return problems


def sharded(cfg) -> bool:
    """FSDP or DeepSpeed: they hold the gradients and clip them in their own wrappers."""
    return bool(cfg.get("fsdp_config") or cfg.get("fsdp") or cfg.get("deepspeed"))


def fp8_problems(cfg) -> list[str]:
    """What fast_steps_fp8_base needs of a recipe (fp8_base.py says why)."""
    needs = []
    if not cfg.get("load_in_4bit"):
        needs.append("`load_in_4bit: true` (it replaces the 4-bit weights' products)")
    off = [k for k in LORA_KERNEL_KEYS if cfg.get(k) is False]
    if off:  # the products it replaces are the kernels'
        needs.append(" ".join(f"remove `{k}: false`" for k in off))
    if cfg.get("fast_steps_compile"):
        needs.append("`fast_steps_compile: false`")
    return [f"{NAME}: fast_steps_fp8_base needs {need} (or set `fast_steps_fp8_base: false`)"
            for need in needs]


def cuda_graph_problems(cfg) -> list[str]:
    """What fast_steps_cuda_graphs needs of a recipe (cuda_graphs.py says why)."""
    needs = []
    if not cfg.get("pad_to_sequence_len"):
        needs.append("`pad_to_sequence_len: true` (a graph replays fixed shapes)")
    if (cfg.get("gradient_accumulation_steps") or 1) != 1:
        needs.append("`gradient_accumulation_steps: 1` (each replay overwrites the last "
                     "micro-batch's gradients)")
    if cfg.get("gradient_checkpointing"):
        needs.append("`gradient_checkpointing: false`")
    if not option(cfg, "fast_steps_packed_layout"):
        needs.append("`fast_steps_packed_layout` on (the graphed attention reads its layout)")
    if cfg.get("fast_steps_compile") or cfg.get("torch_compile"):
        needs.append("no `fast_steps_compile`/`torch_compile`")
    if not needs:
        return []
    return [f"{NAME}: fast_steps_cuda_graphs needs {'; '.join(needs)} (or set "
            "`fast_steps_cuda_graphs: false`)"]


def install_packed_layout(cuda_half_precision: bool = True, native_gqa: bool = False) -> bool:
    """Register the packed attention over Axolotl's varlen `sdpa` (idempotent); False when there
    is nothing to replace because the run is not CUDA fp16/bf16 (Axolotl then keeps stock SDPA
    with a block-diagonal mask, since varlen_attn only runs there)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(current, "_fast_steps", None) == {"native_gqa": native_gqa}:
        return True
    if native_gqa and cuda_half_precision and not varlen_takes_gqa():
        import torch

        raise UserError(f"{NAME}: fast_steps_packed_gqa needs torch's varlen_attn to take "
                        f"`enable_gqa`, which torch {torch.__version__} lacks; set "
                        "`fast_steps_packed_gqa: false`")
    stock = getattr(current, AXOLOTL_ORIGINAL_ATTR, None)
    if stock is None:
        if not cuda_half_precision:
            LOG.info("fast_steps: not a CUDA fp16/bf16 run, stock SDPA stays")
            return False
        import axolotl

        written_for = pinned("axolotl")
        raise UserError(
            f"{NAME}: the registered `sdpa` attention is not Axolotl's sdpa_varlen "
            f"wrapper (axolotl {axolotl.__version__}; written against {written_for}, whose "
            f"wrapper keeps the stock function as `{AXOLOTL_ORIGINAL_ATTR}`); set "
            f"`fast_steps_packed_layout: false` or pin axolotl=={written_for}")
    packed = make_packed_sdpa(stock, LAYOUTS, native_gqa=native_gqa)
    packed._fast_steps = {"native_gqa": native_gqa}
    setattr(packed, AXOLOTL_ORIGINAL_ATTR, stock)  # Axolotl's unpatch still restores stock sdpa
    ALL_ATTENTION_FUNCTIONS.register("sdpa", packed)
    LOG.info("fast_steps: varlen SDPA with the packing layout read once per micro-batch")
    return True


def freeze_garbage_collector(when: str) -> None:
    """Collect once, then move every object that survived out of the collector's scans: later
    full collections only walk objects made since. Only live objects are frozen, so nothing
    that is garbage now is kept."""
    gc.collect()
    gc.freeze()
    LOG.info("fast_steps: %d objects frozen out of garbage collection (%s)",
             gc.get_freeze_count(), when)


class FreezeGarbageCollector(TrainerCallback):
    """At the start of training, freeze what survives (the model, datasets, modules): later
    collections only look at objects made during training."""

    def on_train_begin(self, args, state, control, **kwargs):
        freeze_garbage_collector("training starts")


class RequireMasterWeightOptimizer(TrainerCallback):
    """The bf16 weights only change through MasterWeightAdamW: stop at once if the Trainer
    built another optimizer (another Axolotl version creating it differently)."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, if any
        if not isinstance(inner, MasterWeightAdamW):
            with reported(newline=True):
                raise UserError(
                    f"{NAME}: the Trainer uses {type(inner).__name__}, not the fp32-master "
                    "AdamW that fast_steps_bf16_lora needs; set `fast_steps_bf16_lora: false`")


class ReportCompiledLayers(TrainerCallback):
    """After the first optimizer step (the one that compiled) and at the end of training, what
    dynamo made of the layers, in `<output_dir>/fast_steps_compile.json`; a graph break is
    also logged as a warning (it costs speed, not correctness)."""

    def __init__(self, compiled: CompiledLayers):
        self.compiled = compiled

    def _report(self, args, when: str):
        report = {"when": when, "mode": self.compiled.mode, "layers": self.compiled.layers,
                  "compiled_calls": self.compiled.compiled_calls,
                  "eager_calls": self.compiled.eager_calls, **compile_report()}
        if args.process_index == 0:
            write_json(Path(args.output_dir) / COMPILE_REPORT, report)
        level = (logging.WARNING if report["graph_breaks"] or report["resumed_frames"]
                 else logging.INFO)
        LOG.log(level, "fast_steps compile: %s", json.dumps(report))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self._report(args, "step 1")

    def on_train_end(self, args, state, control, **kwargs):
        self._report(args, f"end (step {state.global_step})")


class CaptureCudaGraphs(TrainerCallback):
    """Captures the decoder stack's graphs before the second optimizer step (the first ran
    eagerly and recorded the shapes), and reports, after step 2 and at the end, how many
    training micro-batches were replayed and how many ran eagerly, in
    `<output_dir>/fast_steps_cuda_graphs.json` and as a log line."""

    def __init__(self, stack: GraphedStack):
        self.stack = stack
        self.autocast_dtype = None  # the Trainer's mixed precision, set with the Trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if self.stack.ready_to_capture:
            with reported(newline=True):
                try:
                    self.stack.capture(self.autocast_dtype)
                except RuntimeError as err:
                    first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                    raise UserError(f"{NAME}: capturing the decoder layers as a CUDA graph "
                                    f"failed ({first[:300]}); set `fast_steps_cuda_graphs: "
                                    "false`") from err

    def _report(self, args, when: str):
        report = {"when": when, **self.stack.report()}
        if args.process_index == 0:
            write_json(Path(args.output_dir) / CUDA_GRAPHS_REPORT, report)
        # a warning, so that it shows in Axolotl's log, which keeps other loggers' INFO out
        LOG.warning("fast_steps cuda graphs: %s", json.dumps(report))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self._report(args, "step 2")

    def on_train_end(self, args, state, control, **kwargs):
        self._report(args, f"end (step {state.global_step})")


class FastStepsPlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self.params, self.masters = [], []
        self.compiled = None
        self.graphs = None  # CaptureCudaGraphs, with fast_steps_cuda_graphs

    def get_input_args(self):
        return "integrations.fast_steps.FastStepsArgs"

    def register(self, cfg):
        with reported():
            stop_on(settings_problems(dict(cfg)))
        if option(cfg, "fast_steps_dataset_save_in_process"):  # before Axolotl loads the data
            save_in_process()
        if option(cfg, "fast_steps_gc_freeze_imports") and training(cfg):
            # The imports leave ~600k objects, and every full collection walks them all: ~0.4 s
            # each, ten while Axolotl packs the data (its multipack sampler collects after every
            # packing pass) and as many again while the Trainer is set up.
            freeze_garbage_collector("after the imports and the config")

    def post_model_load(self, cfg, model):
        import torch

        if not training(cfg):
            return

        half = cfg.get("torch_dtype") in (torch.float16, torch.bfloat16)
        cuda_half = half and torch.cuda.is_available()
        if option(cfg, "fast_steps_packed_layout"):
            with reported():
                install_packed_layout(cuda_half_precision=cuda_half,
                                      native_gqa=bool(cfg.get("fast_steps_packed_gqa")))
        if option(cfg, "fast_steps_bf16_lora") and cfg.get("torch_dtype") == torch.bfloat16:
            self.params, self.masters = cast_trainable_to_bf16(model)
            LOG.info("fast_steps: %d LoRA tensors in bf16, fp32 masters in the optimizer",
                     len(self.params))

    def post_trainer_create(self, cfg, trainer):
        import torch

        if cfg.get("fast_steps_fused_lora_qkv") and training(cfg):  # after Axolotl's patches
            count = install_fused_qkv(trainer.model)
            if not count:
                with reported(newline=True):
                    raise UserError(
                        f"{NAME}: fast_steps_fused_lora_qkv found no attention layer on Axolotl's "
                        "LoRA QKV kernel with LoRA on q/k/v_proj, one scale and no bias or DoRA; "
                        "set `fast_steps_fused_lora_qkv: false`")
            LOG.info("fast_steps: %d attention layers with fused LoRA Q/K/V products", count)
        if option(cfg, "fast_steps_lean_walks") and training(cfg):
            install_lean_walks(trainer)
        fp8 = cfg.get("fast_steps_fp8_base")
        if fp8 and training(cfg):
            if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
                with reported(newline=True):
                    raise UserError(f"{NAME}: fast_steps_fp8_base needs a GPU with FP8 tensor "
                                    "cores (compute capability 8.9+: Ada, Hopper or newer); "
                                    "set `fast_steps_fp8_base: false`")
            count = install_fp8_base(trainer.model, fp8)
            LOG.info("fast_steps: %d 4-bit base weights with FP8 products (%s)", count, fp8)
        if self.compiled:
            # last of all: after Axolotl's and Liger's patches and the packed attention
            count = self.compiled.install(trainer.model)
            LOG.info("fast_steps: %d decoder layers compiled (mode %s), attention eager",
                     count, self.compiled.mode)
        if self.graphs:  # last: the layers' forwards as every other patch left them
            count = self.graphs.stack.install(trainer.model)
            precision = getattr(trainer.accelerator, "mixed_precision", "no")
            self.graphs.autocast_dtype = {"bf16": torch.bfloat16,
                                          "fp16": torch.float16}.get(precision)
            LOG.info("fast_steps: %d decoder layers to replay as CUDA graphs", count)
        if not self.params:
            return
        args = trainer.args
        trainer.optimizer = MasterWeightAdamW(
            self.params, self.masters, free_grads=option(cfg, "fast_steps_free_master_grads"),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.weight_decay)

    def add_callbacks_pre_trainer(self, cfg, model):
        if not training(cfg):
            return []
        callbacks = [FreezeGarbageCollector()] if option(cfg, "fast_steps_gc_freeze") else []
        if self.params:
            callbacks.append(RequireMasterWeightOptimizer())
        if cfg.get("fast_steps_compile"):  # installed in post_trainer_create, after the patches
            self.compiled = CompiledLayers(cfg.get("fast_steps_compile_mode") or "default")
            callbacks.append(ReportCompiledLayers(self.compiled))
        if cfg.get("fast_steps_cuda_graphs"):
            import torch

            if not torch.cuda.is_available():
                with reported():
                    raise UserError(f"{NAME}: fast_steps_cuda_graphs needs a CUDA GPU; set "
                                    "`fast_steps_cuda_graphs: false`")
            self.graphs = CaptureCudaGraphs(GraphedStack(LAYOUTS))
            callbacks.append(self.graphs)
        return callbacks
