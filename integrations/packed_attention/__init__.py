"""Packed-row attention without a GPU synchronisation per layer (see README.md)."""

from integrations.packed_attention.plugin import PackedAttentionPlugin

__all__ = ["PackedAttentionPlugin"]
