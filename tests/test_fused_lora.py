"""integrations.fast_steps' fused LoRA Q/K/V (fast_steps_fused_lora_qkv) computes what Axolotl's
LoRA_QKV computes, with shared products.

Tolerance: 1e-5 relative to each tensor's largest value, in float32. The fused form multiplies
the same numbers; only the order of some sums changes (one product over the three adapters'
rank dimensions instead of three accumulated ones), which moves float32 results by about 1e-7
relative. A wrong transpose, scale or slice moves them by order 1.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, repo_env
from test_integrations import RECIPE_SETTINGS  # what the plugin's other parts need

from integrations.fast_steps import plugin as fast_steps
from integrations.fast_steps.fused_lora import FusedLoRAQKV, install_fused_qkv, plain_qkv

TOLERANCE = 1e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def step(function, X, params):
    """Outputs and the gradients of X and every parameter for a loss weighing Q, K, V unequally."""
    for p in [X, *params]:
        p.grad = None
    Q, K, V = function()
    weights = torch.linspace(-1, 1, Q.shape[-1])
    ((Q * weights).sum() + (K ** 2).sum() + (1.5 * V).sum()).backward()
    return [Q.detach(), K.detach(), V.detach(), X.grad.clone(), *(p.grad.clone() for p in params)]


@pytest.mark.parametrize("device,dtype,four_bit,tolerance", [
    ("cpu", torch.float32, False, TOLERANCE),
    # bf16 keeps 8 mantissa bits: sums in another order differ by up to ~1e-2 relative
    pytest.param("cuda", torch.bfloat16, False, 2e-2, marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, True, 2e-2, marks=pytest.mark.gpu),
])
def test_fused_qkv_equals_axolotls_lora_qkv(device, dtype, four_bit, tolerance):
    """Grouped-query shapes (K and V narrower than Q), a batch of 2 rows, scale 2; on a GPU also
    with the base weights in bitsandbytes' 4-bit nf4 (double-quantised), as in the recipe."""
    from axolotl.kernels.lora import LoRA_QKV

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, generator=generator) * scale).to(device, dtype)
        return t.requires_grad_(grad)

    d, r, out_q, out_kv, s = 64, 8, 64, 16, 2.0
    X = tensor(2, 24, d, grad=True)
    Wq, Wk, Wv = tensor(out_q, d, scale=0.1), tensor(out_kv, d, scale=0.1), tensor(out_kv, d, scale=0.1)
    quants = (None, None, None)
    if four_bit:
        import bitsandbytes as bnb

        packed = [bnb.nn.Params4bit(W.cpu(), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True).to(device) for W in (Wq, Wk, Wv)]
        (Wq, Wk, Wv), quants = packed, tuple(W.quant_state for W in packed)
    Qq, Qk, Qv = quants
    Aq, Ak, Av = (tensor(r, d, scale=0.1, grad=True) for _ in range(3))
    Bq, Bk, Bv = (tensor(o, r, scale=0.1, grad=True) for o in (out_q, out_kv, out_kv))
    params = [Aq, Bq, Ak, Bk, Av, Bv]
    axolotl = step(lambda: LoRA_QKV.apply(
        X, None, Wq, None, Qq, Aq, Bq, s, None, None, Wk, None, Qk, Ak, Bk, s, None, None,
        Wv, None, Qv, Av, Bv, s, None, None, True), X, params)
    fused = step(lambda: FusedLoRAQKV.apply(X, s, Wq, Qq, Wk, Qk, Wv, Qv, *params), X, params)
    names = ["Q", "K", "V", "dX", "dA_q", "dB_q", "dA_k", "dB_k", "dA_v", "dB_v"]
    differences = {n: relative(a.float(), b.float()) for n, a, b in zip(names, axolotl, fused, strict=True)}
    assert max(differences.values()) < tolerance, differences


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, n, bias=False)
                                                 for n in (16, 8, 8))


def attention_with_lora(**lora):
    """peft's LoRA on a bare attention module, bound to Axolotl's QKV kernel as Axolotl does."""
    import types

    from axolotl.kernels.lora import apply_lora_qkv
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(Attention()), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], **lora))
    attention = model.base_model.model[0]
    attention.apply_qkv = types.MethodType(apply_lora_qkv, attention)
    return model, attention


@pytest.mark.parametrize("lora,covered", [
    ({}, True),
    ({"lora_dropout": 0.1}, False),
    ({"alpha_pattern": {"k_proj": 4}}, False),  # k_proj's scale 1, q and v's 2
    ({"use_dora": True}, False),
    ({"lora_bias": True}, False),  # a bias on LoRA B
])
def test_only_the_plain_case_is_taken_over(lora, covered):
    from axolotl.kernels import lora as axolotl_lora

    model, attention = attention_with_lora(**lora)
    assert (plain_qkv(axolotl_lora, attention) is not None) == covered
    assert install_fused_qkv(model) == int(covered)


def test_recipe_settings_the_fused_form_cannot_serve_are_one_line_errors():
    from core.errors import UserError

    plugin = fast_steps.FastStepsPlugin()
    for change, says in (({"lora_qkv_kernel": False}, "remove `lora_qkv_kernel: false`"),
                         ({"lora_dropout": 0.05}, "needs `lora_dropout: 0`")):
        with pytest.raises(UserError, match=says) as err:
            plugin.register({**RECIPE_SETTINGS, "fast_steps_fused_lora_qkv": True, **change})
        assert "\n" not in str(err.value)
    plugin.register({**RECIPE_SETTINGS, "fast_steps_fused_lora_qkv": True, "lora_dropout": 0.0})


def test_fused_qkv_through_axolotls_trainer_gives_axolotls_loss_and_gradients(tiny_model,
                                                                              tmp_path):
    """The tiny recipe with Axolotl's LoRA QKV kernel, built by Axolotl's own loaders with and
    without the option: every attention layer switched, the same loss and gradients."""
    env = repo_env()
    run = subprocess.run([sys.executable, "tests/_fused_qkv_probe.py",
                          "recipes/tiny-mistral-cpu.yml", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("PROBE ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[0][len("PROBE "):])
    layers = 2  # the tiny model's decoder layers
    assert result["cases"]["axolotl"]["axolotl_layers"] == layers
    assert result["cases"]["axolotl"]["fused_layers"] == 0
    assert result["cases"]["fused"]["fused_layers"] == layers
    assert result["cases"]["fused"]["axolotl_layers"] == 0
    assert result["same_parameters"] and result["qkv_lora_tensors"] == 6 * layers
    assert result["loss_diff"] < TOLERANCE
    assert result["qkv_grad_diff"] < TOLERANCE and result["other_grad_diff"] < TOLERANCE
