"""The scoring core shared by every perplexity metric: per-token negative log-likelihood.

`batch_token_nll` is the only place a model is run for scoring. A scoring *window* is a slice
of token ids plus the index of its first target; token t of a window is scored as
-log p(ids[t] | ids[:t]) for first_target <= t < len. Position 0 never is (nothing predicts it),
so BOS or the context prefix is never a predicted token. Windows of different lengths are
batched with padding; padded positions get attention mask 0, position ids that continue from
the real tokens, and are never scored, so results do not depend on batch size or padding side.

Sliding windows over a long token stream (`sliding_windows`), as in Hugging Face's "perplexity
of fixed-length models" guide: window k feeds ids[k*stride : k*stride + window] and scores the
tokens after those scored by window k-1, so each token after position 0 is scored once, with up
to window-1 tokens of context (and at least window-stride, except at the start). With
stride == window the windows are disjoint chunks and each chunk's first token is context only:
scored = n - ceil(n / window); with stride < window, scored = n - 1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

LOG = logging.getLogger("eval.scoring")


@dataclass(frozen=True)
class Window:
    ids: list[int]  # model input
    first_target: int  # index in ids of the first scored token (>= 1)


@dataclass
class ScoreStats:
    input_tokens: int = 0  # real (non-pad) tokens fed to the model
    scored_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.input_tokens / self.seconds if self.seconds > 0 else float("nan")


def batch_token_nll(model, input_ids, attention_mask, target_mask):
    """NLL in nats (float32, shape [B, T]) of each token given the tokens before it.

    nll[b, t] = -log p(input_ids[b, t] | input_ids[b, :t]) where target_mask[b, t], else 0.
    target_mask must be False at t = 0 and at padding.
    """
    import torch

    # Position ids count real tokens only, so a left-padded row sees the same positions as an
    # unpadded one.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits
    logits = logits[:, :-1].float()
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target], without materialising
    # a second [B, T, vocab] tensor of log-probabilities.
    token_nll = torch.logsumexp(logits, dim=-1) - logits.gather(
        -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    nll = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    # where(), not multiplication: a fully masked (padding) query row may hold NaN.
    nll[:, 1:] = torch.where(target_mask[:, 1:], token_nll, torch.zeros_like(token_nll))
    return nll


def score_windows(model, windows: list[Window], batch_size: int = 8, pad_id: int = 0,
                  padding_side: str = "right", desc: str = "scoring", progress: bool = True):
    """NLL (list of floats, nats) of each window's targets, in window order, plus ScoreStats.

    Windows are sorted by length so a batch holds similar lengths (less padding); the order of
    the results is the order of `windows`.
    """
    import torch
    from tqdm.auto import tqdm

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    for w in windows:
        if not 1 <= w.first_target <= len(w.ids):
            raise ValueError(f"first_target {w.first_target} outside a {len(w.ids)}-token window")
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    results: list[list[float] | None] = [None] * len(windows)
    stats = ScoreStats()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in bar:
            width = max(len(windows[i].ids) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            target = torch.zeros((len(batch), width), dtype=torch.bool)
            offsets = []
            for row, i in enumerate(batch):
                w = windows[i]
                off = width - len(w.ids) if padding_side == "left" else 0
                ids[row, off : off + len(w.ids)] = torch.tensor(w.ids, dtype=torch.long)
                attn[row, off : off + len(w.ids)] = 1
                target[row, off + w.first_target : off + len(w.ids)] = True
                offsets.append(off)
            nll = batch_token_nll(model, ids.to(device), attn.to(device), target.to(device))
            nll = nll.double().cpu()
            for row, i in enumerate(batch):
                w, off = windows[i], offsets[row]
                results[i] = nll[row, off + w.first_target : off + len(w.ids)].tolist()
                stats.input_tokens += len(w.ids)
                stats.scored_tokens += len(w.ids) - w.first_target
            stats.seconds = time.perf_counter() - start
            bar.set_postfix(tok_s=f"{stats.tokens_per_s:,.0f}")
    bar.close()
    return results, stats


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) in stream coordinates for each window; see module docstring."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, not {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window ({window}), not {stride}")
    spans = []
    begin, prev_end = 0, 0
    while n_tokens > 1:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
        begin += stride
    return spans


def windows_of(ids: list[int], window: int, stride: int) -> list[Window]:
    """Sliding windows over one token sequence (a single window if it fits)."""
    return [Window(ids[b:e], first - b) for b, e, first in sliding_windows(len(ids), window, stride)]
