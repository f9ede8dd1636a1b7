"""Axolotl plugin: packed-row attention with one GPU synchronisation per micro-batch.

    plugins:
      - integrations.packed_attention.PackedAttentionPlugin
    attn_implementation: sdpa
    sample_packing: true
    sdpa_varlen: true

It replaces the `sdpa` attention function that Axolotl's `sdpa_varlen` option registers with
one that computes the packing layout once per micro-batch (attention.py says why). It checks at
start-up that Axolotl's varlen attention is the function it replaces, and stops with one line
if not (another Axolotl version, or `sdpa_varlen` off), instead of silently doing nothing.
"""

from __future__ import annotations

import logging

from integrations.packed_attention.attention import LayoutCache, make_packed_sdpa

try:  # the plugin base class only exists where axolotl is installed
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover
    BasePlugin = object

LOG = logging.getLogger(__name__)
# transformers' attention registry entry that Axolotl's sdpa_varlen patch replaces; its wrapper
# keeps the stock function under this attribute (axolotl/monkeypatch/attention/sdpa_varlen.py)
AXOLOTL_ORIGINAL_ATTR = "_axolotl_sdpa_original"
LAYOUTS = LayoutCache()


class PackedAttentionError(SystemExit):
    """Stops `axolotl train` with the message and exit status 1, no traceback."""


def required_settings_problem(cfg) -> str | None:
    """Why this recipe cannot use the plugin, or None."""
    wanted = {"attn_implementation": "sdpa", "sample_packing": True, "sdpa_varlen": True}
    wrong = [f"`{key}: {str(value).lower()}`" for key, value in wanted.items()
             if cfg.get(key) != value]
    if wrong:
        return ("integrations.packed_attention.PackedAttentionPlugin needs "
                + ", ".join(wrong) + " in the recipe (or remove the plugin)")
    return None


def install(cuda_half_precision: bool = True) -> bool:
    """Register the packed attention over Axolotl's varlen `sdpa` (idempotent); False when
    there is nothing to replace because the run is not CUDA fp16/bf16 (then Axolotl keeps stock
    SDPA with a block-diagonal mask, since varlen_attn only runs there)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(current, "_packed_attention", False):
        return True
    stock = getattr(current, AXOLOTL_ORIGINAL_ATTR, None)
    if stock is None:
        if not cuda_half_precision:
            LOG.info("packed attention: not a CUDA fp16/bf16 run, stock SDPA stays")
            return False
        import axolotl

        raise PackedAttentionError(
            f"error: integrations.packed_attention: the registered `sdpa` attention is not "
            f"Axolotl's sdpa_varlen wrapper (axolotl {axolotl.__version__}; this plugin was "
            "written against 0.19.0, where the wrapper keeps the stock function as "
            f"`{AXOLOTL_ORIGINAL_ATTR}`); remove the plugin from the recipe or pin axolotl==0.19.0")
    packed = make_packed_sdpa(stock, LAYOUTS)
    packed._packed_attention = True
    setattr(packed, AXOLOTL_ORIGINAL_ATTR, stock)  # Axolotl's unpatch still restores stock sdpa
    ALL_ATTENTION_FUNCTIONS.register("sdpa", packed)
    LOG.info("packed attention: varlen SDPA with the packing layout computed once per micro-batch")
    return True


class PackedAttentionPlugin(BasePlugin):
    """Installs the packed attention after the model (and Axolotl's attention patches) loaded."""

    def register(self, cfg):
        problem = required_settings_problem(dict(cfg))
        if problem:
            raise PackedAttentionError(f"error: {problem}")

    def post_model_load(self, cfg, model):
        import torch

        half = cfg.get("torch_dtype") in (torch.float16, torch.bfloat16)
        install(cuda_half_precision=half and torch.cuda.is_available())
