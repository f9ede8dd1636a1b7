"""The repository's Axolotl plugins (integrations/): each applies against the installed Axolotl,
gives the same results as the code it replaces, and refuses in one line where it cannot apply."""

from __future__ import annotations

import gc
import io

import pytest
import torch

from core.errors import UserError
from integrations.fast_steps import plugin as fast_steps
from integrations.fast_steps.master_weights import MasterWeightAdamW, cast_trainable_to_bf16
from integrations.fast_steps.packed_layout import LayoutCache, packed_layout, varlen_takes_gqa


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
    assert hasattr(axolotl_sdpa, fast_steps.AXOLOTL_ORIGINAL_ATTR), (
        "Axolotl's varlen wrapper no longer keeps the stock function where the plugin looks")
    model = tiny_mistral(layers=3)
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    pid = random_packed_position_ids(2, 96, 7)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pid).logits

    assert fast_steps.install_packed_layout(cuda_half_precision=True)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not axolotl_sdpa
    before = fast_steps.LAYOUTS.computed
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pid).logits
    assert fast_steps.LAYOUTS.computed == before + 1  # once for 3 layers
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

    assert not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], fast_steps.AXOLOTL_ORIGINAL_ATTR)
    assert fast_steps.install_packed_layout(cuda_half_precision=False) is False  # CPU/fp32: nothing to do
    with pytest.raises(UserError) as err:
        fast_steps.install_packed_layout(cuda_half_precision=True)
    message = str(err.value)
    assert "\n" not in message and "axolotl" in message and "0.19.0" in message


RECIPE_SETTINGS = {"attn_implementation": "sdpa", "sample_packing": True, "sdpa_varlen": True,
                   "optimizer": "adamw_torch_fused", "bf16": True}


@pytest.mark.parametrize(("change", "says"), [
    ({"sdpa_varlen": None}, "`sdpa_varlen: true`"),
    ({"optimizer": "paged_adamw_8bit"}, "`optimizer: adamw_torch_fused`"),
    ({"fsdp_config": {"fsdp_version": 2}, "fast_steps_lean_walks": False}, "does not support FSDP"),
])
def test_plugin_refuses_recipe_settings_it_cannot_serve(change, says):
    plugin = fast_steps.FastStepsPlugin()
    plugin.register(RECIPE_SETTINGS)
    with pytest.raises(UserError) as err:
        plugin.register({**RECIPE_SETTINGS, **change})
    assert says in str(err.value) and "\n" not in str(err.value)
    # the part that needs the setting can be switched off instead
    part = "fast_steps_packed_layout" if "sdpa" in says else "fast_steps_bf16_lora"
    plugin.register({**RECIPE_SETTINGS, **change, part: False})


def test_plugin_leaves_merge_and_inference_alone():
    """`axolotl merge-lora` clears attn_implementation and never trains: the plugin must neither
    refuse the recipe nor patch anything then."""
    plugin = fast_steps.FastStepsPlugin()
    for mode in ("merge_lora", "inference"):
        cfg = {**RECIPE_SETTINGS, "attn_implementation": None, mode: True}
        plugin.register(cfg)
        assert plugin.add_callbacks_pre_trainer(cfg, model=None) == []
    with pytest.raises(UserError, match="attn_implementation"):
        plugin.register({**RECIPE_SETTINGS, "attn_implementation": None})


@pytest.fixture(autouse=True)
def collector_unfrozen_after():
    """register() freezes this process's garbage collector; each test leaves it as it found it."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_config_load_freezes_what_the_imports_made():
    """Axolotl runs ~20 full collections between config load and the first step (each packing
    pass of its multipack sampler ends with one); freezing at register() keeps them from walking
    the objects the imports made. Only live objects are frozen: garbage is collected first."""
    made_by_imports = [[index] for index in range(200_000)]
    garbage = [[] for _ in range(1_000)]
    for item in garbage:
        item.append(item)  # reference cycles: only a collection frees them
    del garbage
    fast_steps.FastStepsPlugin().register(dict(RECIPE_SETTINGS))
    frozen = gc.get_freeze_count()
    assert frozen >= len(made_by_imports)
    gc.unfreeze()
    assert gc.collect() == 0  # the cycles were collected before the freeze, not frozen
    for cfg in ({**RECIPE_SETTINGS, "fast_steps_gc_freeze_imports": False},
                {**RECIPE_SETTINGS, "attn_implementation": None, "merge_lora": True}):
        fast_steps.FastStepsPlugin().register(cfg)
        assert gc.get_freeze_count() == 0, cfg


def lora_like_model(seed: int = 0) -> torch.nn.Module:
    """Frozen bf16 base weights and fp32 trainable A/B matrices, like a peft LoRA model."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False),
                                torch.nn.Linear(4, 16, bias=False),
                                torch.nn.Linear(16, 16, bias=False).to(torch.bfloat16))
    model[2].weight.requires_grad_(False)
    return model


def lora_loss(model, x):
    hidden = x.to(torch.bfloat16)
    lora = model[1].weight.to(torch.bfloat16) @ (model[0].weight.to(torch.bfloat16) @ hidden.T)
    return ((model[2](hidden) + lora.T).float() ** 2).mean()


@pytest.mark.parametrize("free_grads", [False, True])
def test_master_weights_update_exactly_like_fp32_weights_cast_per_step(free_grads):
    """bf16 weights + fp32 masters give the same values as fp32 weights cast to bf16 in every
    step (what the fused LoRA kernels do), step after step; with free_grads the fp32 gradient
    copies exist only during the step."""
    reference, fast = lora_like_model(), lora_like_model()
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=0.05,
                                foreach=False)
    params, masters = cast_trainable_to_bf16(fast)
    assert [p.dtype for p in params] == [torch.bfloat16] * 2 and len(masters) == 2
    opt = MasterWeightAdamW(params, masters, free_grads=free_grads, lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 16, generator=generator)
        for model, optimizer in ((reference, ref_opt), (fast, opt)):
            model.zero_grad()
            lora_loss(model, x).backward()
            optimizer.step()
        for ref_param, master, param in zip(ref_opt.param_groups[0]["params"], opt.masters,
                                            params, strict=True):
            torch.testing.assert_close(master, ref_param, rtol=0, atol=0)
            assert torch.equal(param, ref_param.to(torch.bfloat16))
            assert (master.grad is None) == free_grads
        assert (opt._grad_block.untyped_storage().nbytes() == 0) == free_grads


@pytest.mark.parametrize("free_grads", [False, True])
def test_master_weights_leave_a_parameter_without_gradient_unchanged(free_grads):
    model = lora_like_model()
    params, masters = cast_trainable_to_bf16(model)
    opt = MasterWeightAdamW(params, masters, free_grads=free_grads, lr=0.05)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    for step in range(3):
        model.zero_grad()
        lora_loss(model, x).backward()
        if step == 2:
            params[1].grad = None  # e.g. a layer no batch reached
        before = [m.clone() for m in opt.masters]
        opt.step()
    assert not torch.equal(opt.masters[0], before[0])
    assert torch.equal(opt.masters[1], before[1])
    assert torch.equal(params[1], before[1].to(torch.bfloat16))


def test_master_weights_resume_from_a_checkpoint_exactly():
    model = lora_like_model()
    params, masters = cast_trainable_to_bf16(model)
    opt = MasterWeightAdamW(params, masters, lr=0.05)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        model.zero_grad()
        lora_loss(model, x).backward()
        opt.step()
    checkpoint = io.BytesIO()  # as the Trainer does: optimizer.pt on disk
    torch.save(opt.state_dict(), checkpoint)
    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    expected = [m.clone() for m in opt.masters]

    resumed = lora_like_model()  # the same base model, a fresh LoRA initialisation
    with torch.no_grad():
        for param in resumed.parameters():
            if param.requires_grad:
                param.add_(1.0)
    r_params, r_masters = cast_trainable_to_bf16(resumed)
    for param, value in zip(r_params, params, strict=True):  # the Trainer restores the adapter
        param.data.copy_(value)
    r_opt = MasterWeightAdamW(r_params, r_masters, lr=0.05)
    r_opt.load_state_dict(saved)
    for master, value in zip(r_opt.masters, expected, strict=True):
        assert torch.equal(master, value)  # fp32 values, not the bf16 adapter's
    for model_, optimizer in ((model, opt), (resumed, r_opt)):
        model_.zero_grad()
        lora_loss(model_, x).backward()
        optimizer.step()
    for a, b in zip(opt.masters, r_opt.masters, strict=True):
        assert torch.equal(a, b)


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
    fast_steps.install_packed_layout(cuda_half_precision=True)
    before = fast_steps.LAYOUTS.computed
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pid).logits
    assert fast_steps.LAYOUTS.computed == before + 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_packed_gqa_is_one_line_error_without_the_packed_layout_and_reinstalls_over_it(
        axolotl_varlen_patch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    plugin = fast_steps.FastStepsPlugin()
    plugin.register({**RECIPE_SETTINGS, "fast_steps_packed_gqa": True})
    with pytest.raises(UserError, match="remove `fast_steps_packed_layout: false`") as err:
        plugin.register({**RECIPE_SETTINGS, "fast_steps_packed_gqa": True,
                         "fast_steps_packed_layout": False})
    assert "\n" not in str(err.value)
    axolotl_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert fast_steps.install_packed_layout(cuda_half_precision=True)
    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert plain._fast_steps == {"native_gqa": False}
    assert fast_steps.install_packed_layout(cuda_half_precision=True, native_gqa=True)
    native = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert native is not plain and native._fast_steps == {"native_gqa": True}
    # both wrap Axolotl's stock function, so Axolotl's unpatch restores stock sdpa either way
    stock = getattr(axolotl_sdpa, fast_steps.AXOLOTL_ORIGINAL_ATTR)
    assert getattr(native, fast_steps.AXOLOTL_ORIGINAL_ATTR) is stock


@pytest.mark.gpu
def test_packed_gqa_on_cuda_gives_the_repeated_heads_results(axolotl_varlen_patch):
    """K/V passed to the varlen kernel with their own 2 heads (4 query heads) give the logits and
    gradients of K/V repeated to 4 heads, to bf16 rounding (2e-2 relative: the kernel sums the
    two query heads' K/V gradients itself instead of the repeat's backward)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not varlen_takes_gqa():
        pytest.skip(f"torch {torch.__version__}'s varlen_attn has no enable_gqa")
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1)).cuda()
    pid = random_packed_position_ids(1, 256, 3).cuda()
    results = {}
    for native in (False, True):
        model = tiny_mistral(layers=2).to("cuda", torch.bfloat16).train()
        fast_steps.install_packed_layout(cuda_half_precision=True, native_gqa=native)
        logits = model(input_ids=ids, position_ids=pid).logits
        logits.float().square().mean().backward()
        results[native] = [logits.detach(), *(p.grad for p in model.parameters())]
    for repeated, own in zip(results[False], results[True], strict=True):
        scale = repeated.float().abs().max().clamp_min(1e-30)
        assert float((repeated.float() - own.float()).abs().max() / scale) <= 2e-2


def test_compile_needs_axolotls_lora_kernels_off_and_no_torch_compile():
    """Axolotl turns its LoRA kernels on when the keys are absent; their ctypes dequantisation
    cannot be traced, so fast_steps_compile asks for each key to be false, in one line."""
    plugin = fast_steps.FastStepsPlugin()
    with pytest.raises(UserError) as err:
        plugin.register({**RECIPE_SETTINGS, "fast_steps_compile": True})
    message = str(err.value)
    assert "\n" not in message and all(
        f"`{key}: false`" in message for key in fast_steps.LORA_KERNEL_KEYS)
    kernels_off = dict.fromkeys(fast_steps.LORA_KERNEL_KEYS, False)
    plugin.register({**RECIPE_SETTINGS, "fast_steps_compile": True, **kernels_off})
    with pytest.raises(UserError, match="remove `torch_compile: true`"):
        plugin.register({**RECIPE_SETTINGS, "fast_steps_compile": True, **kernels_off,
                         "torch_compile": True})


def test_dataset_save_with_one_worker_starts_no_process_pool(tmp_path, monkeypatch):
    """datasets' save_to_disk(num_proc=1) starts a spawn pool (a fresh Python importing the
    caller's __main__ again); with the plugin's wrapper the same files come from this process."""
    import datasets
    from datasets import arrow_dataset

    from integrations.fast_steps.dataset_save import save_in_process

    data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 50, "labels": [[4]] * 50})

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started")

    # datasets' own method (an earlier plugin register() in this process may have wrapped it)
    original = getattr(datasets.Dataset.save_to_disk, "__wrapped__", datasets.Dataset.save_to_disk)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", original)
    monkeypatch.setattr(arrow_dataset.mp, "get_context", no_pool)
    with pytest.raises(AssertionError, match="process pool"):  # datasets as it is
        data.save_to_disk(str(tmp_path / "plain"), num_proc=1)
    assert save_in_process()
    data.save_to_disk(str(tmp_path / "wrapped"), num_proc=1)
    assert datasets.load_from_disk(str(tmp_path / "wrapped")).to_dict() == data.to_dict()


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_compiled_layers_split_restates_the_stock_layer_forward(family):
    """fast_steps_compile runs a layer as before_attention -> attention -> after_attention: the
    same operations as transformers' own forward, so the same values and gradients, bit for
    bit, before anything is compiled."""
    import sys

    import transformers

    from integrations.fast_steps.compiled_layers import attention, split_forward

    config_cls = {"mistral": transformers.MistralConfig, "llama": transformers.LlamaConfig}[family]
    model_cls = {"mistral": transformers.MistralForCausalLM,
                 "llama": transformers.LlamaForCausalLM}[family]
    torch.manual_seed(0)
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                        head_dim=16, attn_implementation="sdpa")
    model = model_cls(config).train()
    layer = model.model.layers[1]
    hidden = torch.randn(2, 12, 64, requires_grad=True)
    position_ids = torch.arange(12)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, position_ids)

    def gradients(output):
        output.square().sum().backward()
        grads = [hidden.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        hidden.grad = None
        layer.zero_grad(set_to_none=True)
        return grads

    stock = layer(hidden, position_ids=position_ids, position_embeddings=(cos, sin))
    stock_grads = gradients(stock)
    before, after = split_forward(sys.modules[type(layer).__module__].apply_rotary_pos_emb)
    query, key, value = before(layer, hidden, cos, sin)
    split = after(layer, hidden, attention(layer, query, key, value, None,
                                           position_ids=position_ids))
    assert torch.equal(split, stock)
    assert all(torch.equal(a, b) for a, b in zip(gradients(split), stock_grads, strict=True))
