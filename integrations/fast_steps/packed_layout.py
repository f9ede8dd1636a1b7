"""Varlen SDPA for packed rows, with the packing layout computed once per micro-batch.

Axolotl's `sdpa_varlen` attention derives the document boundaries (`cu_seqlens`, the longest
document) from `position_ids` inside every attention call, with reductions whose results Python
needs (`int(...)`, `.nonzero()`, `.item()`): GPU synchronisations in every layer, about 100 per
micro-batch for Mistral-7B's 32 layers. Each one empties the GPU's queue of work, so the
GPU waits for Python between layers instead of running ahead of it.

Here the layout is read once per micro-batch: one device-to-host copy of `position_ids`, the
boundaries computed on the host, `cu_seqlens` sent back asynchronously, and the result reused
by every layer that receives the same `position_ids` tensor. The attention itself is the same
`torch.nn.attention.varlen.varlen_attn` call Axolotl makes, with the same fallbacks to stock
SDPA, so results are unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# head_dim limit of the Flash-Attention kernel behind varlen_attn
VARLEN_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class PackedLayout:
    """Where the documents of a packed micro-batch start and end."""

    packed: bool  # more document starts than rows
    cu_seqlens: torch.Tensor | None  # int32 cumulative lengths, on the attention's device
    max_seqlen: int  # the longest document


def document_starts(flat_position_ids: torch.Tensor) -> torch.Tensor:
    """Where the documents of a flattened packed micro-batch start (host tensor in, host out):
    where the position equals the minimum, as transformers' `prepare_fa_kwargs_from_position_ids`
    finds them."""
    return (flat_position_ids == flat_position_ids.min()).nonzero().view(-1)


def packed_layout(position_ids: torch.Tensor, device: torch.device | str) -> PackedLayout:
    """The layout of a micro-batch whose `position_ids` restart at each document.

    Same boundaries as transformers' `prepare_fa_kwargs_from_position_ids` (a document starts
    where the position equals the row minimum), computed on the host after one copy.
    """
    pid = position_ids if position_ids.dim() > 1 else position_ids[None]
    host = pid.detach().to("cpu")  # the one synchronisation of the micro-batch
    if int((host == 0).sum()) <= host.shape[0]:
        return PackedLayout(False, None, 0)
    flat = host.reshape(-1)
    cu_seqlens = torch.cat((document_starts(flat), torch.tensor([flat.numel()]))).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())
    if torch.device(device).type == "cuda":
        cu_seqlens = cu_seqlens.pin_memory().to(device, non_blocking=True)
    return PackedLayout(True, cu_seqlens, max_seqlen)


class LayoutCache:
    """The layout of the `position_ids` tensor seen last: every layer of a forward pass gets the
    same tensor object, so only the first layer computes it."""

    def __init__(self):
        self._key = None
        self._layout = None
        self.computed = 0  # how many layouts were computed (tests read it)
        # while a CUDA graph is captured: the layout in fixed buffers, whatever the ids say
        # (cuda_graphs.py fills them before each replay)
        self.static: PackedLayout | None = None

    def get(self, position_ids: torch.Tensor, device) -> PackedLayout:
        if self.static is not None:
            return self.static
        key = (id(position_ids), position_ids.data_ptr(), position_ids._version,
               tuple(position_ids.shape), str(device))
        if key != self._key:
            self._layout = packed_layout(position_ids, device)
            self._key = key
            self.computed += 1
        return self._layout


def block_diagonal_causal_mask(position_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bool (B, 1, S, S) mask, True = attend: causal within each document only. Used when stock
    SDPA must serve a packed row whose padding mask was dropped (CPU, fp32, custom scale)."""
    pid = position_ids if position_ids.dim() > 1 else position_ids[None]
    doc = (pid == 0).cumsum(-1)
    same_doc = doc[:, :, None] == doc[:, None, :]
    idx = torch.arange(seq_len, device=pid.device)
    causal = idx[:, None] >= idx[None, :]
    return (same_doc & causal[None])[:, None]


def varlen_takes_gqa() -> bool:
    """Whether this torch's varlen_attn takes K/V with fewer heads than Q (`enable_gqa`)."""
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def make_packed_sdpa(stock_sdpa: Callable, cache: LayoutCache,
                     native_gqa: bool = False) -> Callable:
    """An attention function with transformers' `sdpa` signature, for packed training rows.
    With `native_gqa`, grouped-query K/V go to the kernel as they are (`enable_gqa`) instead of
    repeated to the query heads: two copies fewer each way per layer, and the kernel keeps the
    narrower K/V for the backward pass instead of the repeated ones."""
    from torch.nn.attention.varlen import varlen_attn

    params = set(inspect.signature(varlen_attn).parameters)
    # torch >= 2.11 takes window_size ((-1, 0) = causal); 2.10 only is_causal
    has_window = "window_size" in params or "is_causal" not in params

    def packed_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0,
                    scaling: float | None = None, **kwargs: Any):
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None or position_ids is None:  # padded rows, generation
            return stock_sdpa(module, query, key, value, attention_mask, dropout=dropout,
                              scaling=scaling, **kwargs)
        layout = cache.get(position_ids, query.device)
        head_dim = query.shape[-1]
        varlen_ok = (
            layout.packed
            and not dropout
            and head_dim <= VARLEN_MAX_HEAD_DIM
            and (scaling is None or abs(scaling - head_dim**-0.5) < 1e-9)
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
        )
        if not varlen_ok:
            if layout.packed:  # the packing dropped the mask: rebuild document isolation
                attention_mask = block_diagonal_causal_mask(position_ids, query.shape[2])
            return stock_sdpa(module, query, key, value, attention_mask, dropout=dropout,
                              scaling=scaling, **kwargs)

        sliding_window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        if sliding_window and not has_window:
            raise NotImplementedError(
                "packed attention: sliding-window attention needs varlen_attn(window_size=...), "
                f"absent in torch {torch.__version__}; set the model's sliding_window to null")
        batch, q_heads, seq_len, dim = query.shape
        kv_heads = key.shape[1]
        if has_window:
            causal = {"window_size": (sliding_window - 1, 0) if sliding_window else (-1, 0)}
        else:
            causal = {"is_causal": True}
        if kv_heads != q_heads and native_gqa:
            causal["enable_gqa"] = True
        elif kv_heads != q_heads:  # grouped-query attention without enable_gqa: equal heads
            key = key.repeat_interleave(q_heads // kv_heads, dim=1)
            value = value.repeat_interleave(q_heads // kv_heads, dim=1)
            kv_heads = q_heads
        out = varlen_attn(
            query.transpose(1, 2).reshape(batch * seq_len, q_heads, dim),
            key.transpose(1, 2).reshape(batch * seq_len, kv_heads, dim),
            value.transpose(1, 2).reshape(batch * seq_len, kv_heads, dim),
            layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen,
            **causal,
        )
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(batch, seq_len, q_heads, dim), None

    return packed_sdpa
