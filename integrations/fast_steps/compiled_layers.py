"""The training forward (and so the backward) of each decoder layer, compiled around attention.

What a host-bound QLoRA step spends its time on is Python launching small kernels: per layer,
seven LoRA projections (each a 4-bit dequantisation, a matmul, two small LoRA matmuls, a scale
and an add, and as many again backwards), the norms, the rotary embedding and the SwiGLU.
Compiled, each becomes a few generated kernels with the elementwise work fused, launched from
generated code instead of module-by-module Python.

A layer's training forward is split in two compiled functions with the attention between them,
run eagerly: `before_attention` (input norm, q/k/v projections, rotary embedding) and
`after_attention` (output projection, residual, norm, MLP, residual). The attention stays out
because its packed layout (`cu_seqlens`, the longest passage) changes from one micro-batch to
the next, which would recompile a traced attention; it is one kernel each way already. The
split is explicit, not a graph break inside the layer: dynamo would compile the code after such
a break once per layer (the resumed frame holds the layer itself), and then try each layer's
guards in turn on every call.

- One compilation serves all layers: the layer is an argument of the compiled functions, not a
  constant baked into them (a second one is made for the first layer, whose input needs no
  gradient). `<output_dir>/fast_steps_compile.json` says whether that held.
- Only the training forward is compiled (`layer.training`, no KV cache; with gradient
  checkpointing both the no-grad first pass and the recomputation): evaluation and generation
  run the stock forward, so an evaluation costs no compilation and scores exactly as before.
- bitsandbytes (>= 0.46) registers its 4-bit dequantisation as torch.library ops, so dynamo
  traces through `Linear4bit`; Axolotl's fused LoRA kernels call bitsandbytes through ctypes,
  which dynamo cannot trace, so they must be off (plugin.py checks).
- Mistral and Llama layers (`SUPPORTED`): the split restates their forward (transformers 5.x),
  and `tests/test_integrations.py` checks it against the stock forward value for value.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

LOG = logging.getLogger(__name__)
MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
SUPPORTED = ("MistralDecoderLayer", "LlamaDecoderLayer")
# Layer instances are arguments, so they are guarded, not recompiled; the limit only keeps a
# leak of something layer-specific into a trace from silently falling back to eager after 8.
RECOMPILE_LIMIT = 64


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM: `model.model.layers` of the base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or not len(layers):
        raise ValueError(f"no decoder layers found in {type(base).__name__} (expected "
                         "model.model.layers)")
    return list(layers)


def split_forward(rotary: Callable) -> tuple[Callable, Callable]:
    """(before_attention, after_attention) of a Mistral/Llama decoder layer, with the rotary
    embedding function the modeling module holds when the layers are compiled (Liger's, if
    Liger replaced it)."""

    def before_attention(layer, hidden_states, cos, sin):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden_states)
        shape = (*normed.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(normed).view(shape).transpose(1, 2)
        key = attention.k_proj(normed).view(shape).transpose(1, 2)
        value = attention.v_proj(normed).view(shape).transpose(1, 2)
        query, key = rotary(query, key, cos, sin)
        return query, key, value

    def after_attention(layer, hidden_states, attention_output):
        attention_output = attention_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        hidden_states = hidden_states + layer.self_attn.o_proj(attention_output)
        return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))

    return before_attention, after_attention


def attention(layer, query, key, value, attention_mask, **kwargs):
    """The attention call of the stock forward, with the same arguments."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = layer.self_attn
    config = module.config
    modeling = sys.modules[type(module).__module__]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
                                                      modeling.eager_attention_forward)
    extra = {"sliding_window": getattr(config, "sliding_window", None)} if hasattr(
        config, "sliding_window") else {}
    output, _ = interface(module, query, key, value, attention_mask,
                          dropout=0.0 if not module.training else module.attention_dropout,
                          scaling=module.scaling, **extra, **kwargs)
    return output


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
        unsupported = sorted({type(layer).__name__ for layer in layers} - set(SUPPORTED))
        if unsupported:
            raise ValueError(f"decoder layers {', '.join(unsupported)}: fast_steps_compile "
                             f"knows {' and '.join(SUPPORTED)}")
        config = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, key):
                setattr(config, key, max(getattr(config, key), RECOMPILE_LIMIT))
        options = {"mode": None if self.mode == "default" else self.mode, "dynamic": False}
        compiled = {}
        for cls in {type(layer) for layer in layers}:
            modeling = sys.modules[cls.__module__]
            before, after = split_forward(modeling.apply_rotary_pos_emb)
            compiled[cls] = (torch.compile(before, **options), torch.compile(after, **options))
        for index, layer in enumerate(layers):
            layer.forward = self._forward(layer, type(layer).forward, *compiled[type(layer)],
                                          starts_pass=index == 0)
        self.layers = len(layers)
        return self.layers

    def _forward(self, layer, original: Callable, before: Callable, after: Callable,
                 starts_pass: bool = False):
        # CUDA graphs (reduce-overhead): the first layer's forward begins a new pass, which
        # torch's graph trees cannot tell by themselves while the previous pass's outputs are
        # alive (its warm-up then never ends: "Unable to hit fast path of CUDAGraphs"). Not in
        # a backward pass, where gradient checkpointing runs the layer again.
        mark_step = starts_pass and self.mode == "reduce-overhead"

        def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            if not layer.training or past_key_values is not None or position_embeddings is None:
                self.eager_calls += 1
                return original(layer, hidden_states, attention_mask=attention_mask,
                                position_ids=position_ids, past_key_values=past_key_values,
                                use_cache=use_cache, position_embeddings=position_embeddings,
                                **kwargs)
            self.compiled_calls += 1
            if mark_step and torch._C._current_graph_task_id() == -1:
                torch.compiler.cudagraph_mark_step_begin()
            cos, sin = position_embeddings
            query, key, value = before(layer, hidden_states, cos, sin)
            output = attention(layer, query, key, value, attention_mask,
                               position_ids=position_ids, use_cache=use_cache, **kwargs)
            return after(layer, hidden_states, output)

        forward._fast_steps_compiled = True
        return forward


def compile_report() -> dict:
    """Dynamo's counters so far: frames compiled, graphs, graph breaks, resumed frames."""
    from torch._dynamo.utils import counters

    breaks = dict(counters.get("graph_break", {}))
    return {
        "compiled_frames": int(counters["frames"].get("ok", 0)),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(breaks.values())),
        "graph_break_reasons": [reason.splitlines()[0][:160] for reason in breaks],
        "resumed_frames": int(sum(counters.get("resumes", {}).values())),
    }
