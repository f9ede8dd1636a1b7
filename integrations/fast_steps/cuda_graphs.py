"""The decoder stack's training forward and backward replayed as two CUDA graphs.

A QLoRA step of Mistral-7B on one H100/H200 spends longer in the Python that launches its
kernels (about 5,300 per 4,096-token micro-batch, nearly all in the decoder layers: 4-bit
dequantisations, LoRA products, norms, rotary embedding, attention) than the GPU spends running
them. A CUDA graph records those launches once and replays them with one call: here the 32
layers' forward is one graph and their backward another (`torch.cuda.make_graphed_callables`
on one module holding every layer), so a micro-batch costs two replays where it cost thousands
of launches. The embedding, the final norm, the loss and the optimizer stay eager.

What a graph needs, and how each is met:
- Fixed shapes: `pad_to_sequence_len` pads every training row to `sequence_len`.
- No host reads inside: the packing layout (`cu_seqlens`) changes with every micro-batch, so
  the graphed attention reads it from a fixed buffer of `MAX_DOCUMENTS` + 1 offsets, filled
  before each replay (the documents' starts, then the row length repeated: empty documents,
  which the varlen kernels skip), with the longest document fixed at the row length (it only
  sizes the kernels' grid). A micro-batch with more documents runs eagerly.
- Fixed addresses: the graph reads the LoRA weights where they are when it is captured; the
  optimizer updates them in place, as every optimizer here does.
- Gradients: the graphed backward returns the LoRA gradients in buffers the next replay
  overwrites, so each micro-batch's gradients must be used before the next one:
  `gradient_accumulation_steps: 1` (plugin.py checks).

The first training micro-batch runs eagerly (it compiles the Triton kernels and records the
shapes); the graphs are captured before the second optimizer step, after one warm-up pass.
Evaluation, generation and any call that does not match the captured shapes run the layers
eagerly, as before. The first layer's forward runs the whole stack; the other layers hand its
output on unchanged.

Without a GPU, `graphs=False` runs the same stack in one call without capturing, which is how
the CPU tests check everything here but the capture itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from integrations.fast_steps.compiled_layers import decoder_layers
from integrations.fast_steps.packed_layout import LayoutCache, PackedLayout, document_starts

# Packed rows here hold about 9 documents (8 passages of <= 512 tokens and the padding); the
# varlen kernels launch work per document slot, so the bound is generous but not huge.
MAX_DOCUMENTS = 32


def padded_cu_seqlens(position_ids: torch.Tensor, capacity: int) -> torch.Tensor | None:
    """Host int32 offsets of the documents of a packed micro-batch, `capacity` + 1 of them: the
    starts (as packed_layout finds them), then the total length repeated. None when there are
    more documents than `capacity`."""
    flat = position_ids.detach().to("cpu").reshape(-1)  # the micro-batch's one synchronisation
    starts = document_starts(flat)
    if starts.numel() > capacity:
        return None
    offsets = torch.full((capacity + 1,), flat.numel(), dtype=torch.int32)
    offsets[: starts.numel()] = starts.to(torch.int32)
    return offsets


def device_memory_gib() -> dict | None:
    """The CUDA allocator's allocated and reserved bytes now, in GiB (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    gib = 2**30
    return {"allocated": round(torch.cuda.memory_allocated() / gib, 3),
            "reserved": round(torch.cuda.memory_reserved() / gib, 3)}


def warm_up(stack: torch.nn.Module, sample: list[torch.Tensor]) -> None:
    """One forward and backward on a side stream, as make_graphed_callables warms up (lazy
    initialisations must not happen during a capture), then the memory it took released."""
    torch.cuda.synchronize()
    # The first eager step's activations are cached for the default stream, where a side
    # stream cannot reuse them: released first, the warm-up takes their place instead of as
    # much again beside them (the ~15.7 GiB reserved peak measured at the capture)
    torch.cuda.empty_cache()
    with torch.cuda.stream(torch.cuda.Stream()):
        output = stack(*sample)
        wanted = [t for t in (*sample, *stack.parameters()) if t.requires_grad]
        torch.autograd.grad(output, wanted, grad_outputs=torch.zeros_like(output))
    del output
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the eager steps' activations too: the graphs' pool needs them


@dataclass(frozen=True)
class Signature:
    """What a captured stack serves: the shapes of the first layer's arguments."""

    shapes: tuple  # (shape, dtype, requires_grad) of each tensor argument of Stack.forward

    @classmethod
    def of(cls, *tensors: torch.Tensor) -> Signature:
        return cls(tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors))


class Stack(torch.nn.Module):
    """Every decoder layer in one module: what is captured. `position_ids` and the optional
    mask only matter where the attention is not varlen (CPU); the varlen attention reads
    `cu_seqlens` through the layout cache while the graph is captured."""

    def __init__(self, layers: list[torch.nn.Module], forwards: list[Callable]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.forwards = forwards

    def forward(self, hidden, cos, sin, position_ids, cu_seqlens, *mask):
        for forward in self.forwards:
            hidden = forward(hidden, attention_mask=mask[0] if mask else None,
                             position_ids=position_ids, past_key_values=None, use_cache=False,
                             position_embeddings=(cos, sin))
        return hidden


class GraphedStack:
    """Routes a model's training forward through the captured stack (module docstring)."""

    def __init__(self, layouts: LayoutCache, graphs: bool = True,
                 capacity: int = MAX_DOCUMENTS):
        self.layouts, self.graphs, self.capacity = layouts, graphs, capacity
        self.layers: list[torch.nn.Module] = []
        self.forwards: list[Callable] = []
        self.signature: Signature | None = None
        self.sample: tuple | None = None  # the first training call's arguments' shapes
        self.run: Callable | None = None  # the captured stack (or, without graphs, the stack)
        self._pending = None  # the stack's output, which the later layers hand on
        self._host_offsets = None  # kept alive until its copy to the device has run
        self.replays = self.eager_calls = 0
        self.capture_seconds = None
        self.memory_gib: dict = {}  # allocated / reserved around the capture (what the pool holds)

    def install(self, model) -> int:
        self.layers = decoder_layers(model)
        self.forwards = [layer.forward for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer.forward = self._forward(index, layer, self.forwards[index])
        return len(self.layers)

    def _forward(self, index: int, layer: torch.nn.Module, original: Callable) -> Callable:
        last = index == len(self.layers) - 1

        def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            if index and self._pending is not None and hidden_states is self._pending:
                if last:
                    self._pending = None
                return hidden_states
            if (index == 0 and layer.training and torch.is_grad_enabled()
                    and position_ids is not None and past_key_values is None
                    and position_embeddings is not None):
                output = self._replay(hidden_states, position_embeddings, position_ids,
                                      attention_mask)
                if output is not None:
                    self._pending = output if len(self.layers) > 1 else None
                    return output
                self.eager_calls += 1
            return original(hidden_states, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past_key_values,
                            use_cache=use_cache, position_embeddings=position_embeddings,
                            **kwargs)

        forward._fast_steps_cuda_graphs = True
        return forward

    def _replay(self, hidden, position_embeddings, position_ids, mask) -> torch.Tensor | None:
        offsets = padded_cu_seqlens(position_ids, self.capacity)
        if offsets is None:  # more documents than the layout buffer holds
            return None
        if hidden.is_cuda:
            offsets = offsets.pin_memory()
        cu_seqlens = offsets.to(hidden.device, non_blocking=True)
        self._host_offsets = offsets
        args = (hidden, *position_embeddings, position_ids, cu_seqlens,
                *(() if mask is None else (mask,)))
        if self.signature is None:  # the first training call runs eagerly: shapes recorded
            self.signature = Signature.of(*args)
            return None
        if self.run is None or Signature.of(*args) != self.signature:
            return None
        self.replays += 1
        return self.run(*args)

    @property
    def ready_to_capture(self) -> bool:
        return self.signature is not None and self.run is None

    def capture(self, autocast_dtype: torch.dtype | None = None) -> None:
        """Capture the stack's forward and backward (or, without graphs, just build it)."""
        stack = Stack(self.layers, self.forwards)
        if not self.graphs:
            self.run = stack
            return
        device = self.layers[0].input_layernorm.weight.device
        sample = [torch.zeros(shape, dtype=dtype, device=device).requires_grad_(grad)
                  for shape, dtype, grad in self.signature.shapes]
        hidden, cos, _, position_ids, cu_seqlens, *_ = sample
        cos.fill_(1.0)
        rows, length = position_ids.shape[0], position_ids.shape[-1]
        position_ids.copy_(torch.arange(length, device=device).expand(position_ids.shape))
        cu_seqlens.fill_(rows * length)  # one document per row: a valid layout to capture
        cu_seqlens[:rows] = torch.arange(rows, device=device, dtype=cu_seqlens.dtype) * length
        self.memory_gib["before_capture"] = device_memory_gib()
        start = time.perf_counter()
        autocast = (torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False)
                    if autocast_dtype else contextlib.nullcontext())
        # the longest document is fixed at the row length: it only sizes the kernels' grid
        self.layouts.static = PackedLayout(True, cu_seqlens, length)
        try:
            with autocast:
                warm_up(stack, sample)
                # warmed up here, not by make_graphed_callables: its warm-up's memory would
                # stay cached beside the graphs' pool, doubling the activations' share
                self.run = torch.cuda.make_graphed_callables(stack, tuple(sample),
                                                             num_warmup_iters=0)
        finally:
            self.layouts.static = None
        torch.cuda.synchronize()
        self.capture_seconds = round(time.perf_counter() - start, 3)
        self.memory_gib["after_capture"] = device_memory_gib()

    def report(self) -> dict:
        return {"layers": len(self.layers), "graphs": self.graphs, "replays": self.replays,
                "eager_training_calls": self.eager_calls,
                "capture_seconds": self.capture_seconds, "max_documents": self.capacity,
                "memory_gib": {**self.memory_gib, "at_report": device_memory_gib()},
                "signature": None if self.signature is None else [
                    [list(shape), str(dtype), grad]
                    for shape, dtype, grad in self.signature.shapes]}
