"""The repository's Axolotl plugins (integrations/): each applies against the installed Axolotl,
gives the same results as the code it replaces, and refuses in one line where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from integrations.packed_attention import plugin as packed_plugin
from integrations.packed_attention.attention import LayoutCache, packed_layout


def random_packed_position_ids(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """position_ids of rows filled with documents of random lengths (restarting at 0)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        row = []
        while len(row) < seq_len:
            length = int(torch.randint(1, seq_len // 2, (1,), generator=generator))
            row.extend(range(length))
        out.append(row[:seq_len])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(5))
def test_layout_matches_transformers_boundaries(seed):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    pid = random_packed_position_ids(2, 96, seed)
    layout = packed_layout(pid, "cpu")
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(pid)
    assert layout.packed
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == cu_q.tolist()
    assert layout.max_seqlen == int(max_q)


def test_single_document_rows_are_not_packed():
    pid = torch.arange(32).repeat(3, 1)
    assert not packed_layout(pid, "cpu").packed


def test_layout_is_computed_once_per_position_ids_tensor():
    cache = LayoutCache()
    pid = random_packed_position_ids(1, 64, 0)
    first = cache.get(pid, "cpu")
    assert cache.get(pid, "cpu") is first and cache.computed == 1
    pid.add_(0)  # an in-place change bumps the tensor's version: recomputed
    cache.get(pid, "cpu")
    other = random_packed_position_ids(1, 64, 1)
    cache.get(other, "cpu")
    assert cache.computed == 3


def tiny_mistral(layers: int = 2):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=None, attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


@pytest.fixture
def axolotl_varlen_patch():
    """Axolotl's own sdpa_varlen patch, applied for real and removed afterwards."""
    from axolotl.monkeypatch.attention.sdpa_varlen import patch_sdpa_varlen, unpatch_sdpa_varlen

    assert patch_sdpa_varlen(), "Axolotl's sdpa_varlen patch did not apply"
    yield
    unpatch_sdpa_varlen()


def test_plugin_replaces_axolotls_varlen_attention_with_the_same_results(axolotl_varlen_patch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    axolotl_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert hasattr(axolotl_sdpa, packed_plugin.AXOLOTL_ORIGINAL_ATTR), (
        "Axolotl's varlen wrapper no longer keeps the stock function where the plugin looks")
    model = tiny_mistral(layers=3)
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    pid = random_packed_position_ids(2, 96, 7)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pid).logits

    assert packed_plugin.install(cuda_half_precision=True)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not axolotl_sdpa
    before = packed_plugin.LAYOUTS.computed
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pid).logits
    assert packed_plugin.LAYOUTS.computed == before + 1  # once for 3 layers
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a packed row must not attend across documents: the first document's logits do not
    # change when a later document's tokens do
    first_doc_end = int((pid[0] == 0).nonzero()[1])
    changed = ids.clone()
    changed[0, first_doc_end:] = (changed[0, first_doc_end:] + 1) % 128
    with torch.no_grad():
        again = model(input_ids=changed, position_ids=pid).logits
    torch.testing.assert_close(again[0, :first_doc_end], got[0, :first_doc_end])


def test_plugin_stops_in_one_line_where_axolotls_wrapper_is_missing():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], packed_plugin.AXOLOTL_ORIGINAL_ATTR)
    assert packed_plugin.install(cuda_half_precision=False) is False  # CPU/fp32: nothing to do
    with pytest.raises(packed_plugin.PackedAttentionError) as err:
        packed_plugin.install(cuda_half_precision=True)
    message = str(err.value)
    assert "\n" not in message and "axolotl" in message and "0.19.0" in message


def test_plugin_refuses_a_recipe_without_varlen_packing():
    plugin = packed_plugin.PackedAttentionPlugin()
    plugin.register({"attn_implementation": "sdpa", "sample_packing": True, "sdpa_varlen": True})
    with pytest.raises(packed_plugin.PackedAttentionError) as err:
        plugin.register({"attn_implementation": "sdpa", "sample_packing": True})
    assert "`sdpa_varlen: true`" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.gpu
def test_packed_attention_on_cuda_matches_axolotls_varlen_path(axolotl_varlen_patch):
    """On a GPU the varlen kernel runs: same logits as Axolotl's wrapper, one layout per pass."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_mistral(layers=4).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1)).cuda()
    pid = random_packed_position_ids(1, 256, 3).cuda()
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pid).logits
    packed_plugin.install(cuda_half_precision=True)
    before = packed_plugin.LAYOUTS.computed
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pid).logits
    assert packed_plugin.LAYOUTS.computed == before + 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
