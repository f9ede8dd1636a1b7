"""Each decoder layer's training forward (and so its backward) compiled with torch.compile.

What a host-bound QLoRA step spends its time on is Python launching small kernels: per layer,
seven LoRA projections (each a 4-bit dequantisation, a matmul, two small LoRA matmuls, a scale
and an add, and as many again backwards), the norms, the rotary embedding and the SwiGLU.
Compiled, one layer becomes a few generated kernels with the elementwise work fused, launched
from generated code instead of module-by-module Python.

- One compiled function serves all layers: the layer is an input of the compiled function,
  not a constant baked into it, so Mistral's 32 identical layers share one compilation
  (`compiled_calls` and the guard counters in the first-step log say whether that held).
- Only the training forward is compiled (`layer.training` and grad enabled): evaluation and
  generation run the stock forward, so an evaluation costs no second compilation and scores
  exactly as before.
- Attention stays outside the compiled region (`torch.compiler.disable` on the attention
  function): its packed layout (`cu_seqlens`, the longest passage) changes from one micro-batch
  to the next, which would otherwise recompile the layer; the attention itself is one kernel
  each way already.
- bitsandbytes (>= 0.46) registers its 4-bit dequantisation as torch.library ops, so dynamo
  traces through `Linear4bit`; Axolotl's fused LoRA kernels call bitsandbytes through ctypes,
  which dynamo cannot trace, so they must be off (plugin.py checks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

LOG = logging.getLogger(__name__)
MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# Every layer instance is a new input of the one compiled function: guards, not recompiles,
# unless something layer-specific leaks into the trace. The limit keeps a leak from silently
# falling back to eager after 8 layers (torch's default) without letting it run forever.
RECOMPILE_LIMIT = 64
# how dynamo words the graph break at a torch.compiler.disable()d function (the attention)
PLANNED_BREAK = "torch.compiler.disable()"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM: `model.model.layers` of the base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers):
        raise ValueError(f"no decoder layers found in {type(base).__name__} (expected "
                         "model.model.layers)")
    return list(layers)


def outside_compiled_region(function: Callable) -> Callable:
    """The same function, run eagerly when called from compiled code (a clean graph break)."""
    if getattr(function, "_fast_steps_outside", False):
        return function
    wrapped = torch.compiler.disable(function, recursive=True)
    wrapped._fast_steps_outside = True
    for attr in vars(function):  # keep markers such as Axolotl's stock-function attribute
        setattr(wrapped, attr, getattr(function, attr))
    return wrapped


def keep_attention_eager() -> list[str]:
    """Mark every attention function transformers may call as outside the compiled region."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = []
    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        function = ALL_ATTENTION_FUNCTIONS[name]
        if not getattr(function, "_fast_steps_outside", False):
            ALL_ATTENTION_FUNCTIONS.register(name, outside_compiled_region(function))
            names.append(name)
    return names


class CompiledLayers:
    """Compiles the training forward of a model's decoder layers (see the module docstring)."""

    def __init__(self, mode: str = "default"):
        if mode not in MODES:
            raise ValueError(f"compile mode {mode!r}: one of {', '.join(MODES)}")
        self.mode = mode
        self.compiled_calls = 0
        self.eager_calls = 0
        self.layers = 0

    def install(self, model) -> int:
        layers = decoder_layers(model)
        config = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, key):
                setattr(config, key, max(getattr(config, key), RECOMPILE_LIMIT))
        keep_attention_eager()
        classes = {type(layer) for layer in layers}
        compiled = {cls: torch.compile(cls.forward, mode=None if self.mode == "default"
                                       else self.mode, dynamic=False)
                    for cls in classes}
        for layer in layers:
            layer.forward = self._forward(layer, type(layer).forward, compiled[type(layer)])
        self.layers = len(layers)
        return self.layers

    def _forward(self, layer, original: Callable, compiled: Callable) -> Callable:
        def forward(*args, **kwargs):
            if layer.training and torch.is_grad_enabled():
                self.compiled_calls += 1
                return compiled(layer, *args, **kwargs)
            self.eager_calls += 1
            return original(layer, *args, **kwargs)

        forward._fast_steps_compiled = True
        return forward


def compile_report() -> dict:
    """Dynamo's counters so far: graphs, graph breaks (the planned ones at the eager attention
    counted apart), recompiles."""
    from torch._dynamo.utils import counters

    breaks = dict(counters.get("graph_break", {}))
    planned = sum(n for reason, n in breaks.items() if PLANNED_BREAK in reason)
    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "planned_graph_breaks": int(planned),
        "graph_breaks": int(sum(breaks.values()) - planned),
        "graph_break_reasons": [reason.splitlines()[0][:160] for reason in breaks
                                if PLANNED_BREAK not in reason],
        "recompiles": int(sum(counters.get("recompiles", {}).values())),
    }
