"""Held-out evaluation packed into full rows, scoring what unpacked rows score: see README.md."""

from integrations.packed_eval.plugin import PackedEvalPlugin, mask_passage_starts, scored_tokens

__all__ = ["PackedEvalPlugin", "mask_passage_starts", "scored_tokens"]
