"""integrations.fast_steps' FP8 base products (fast_steps_fp8_base): the e4m3 casts, the weight
stand-in's products, and Axolotl's LoRA Q/K/V and O kernels on 4-bit weights with it.

Tolerance: e4m3 keeps 3 mantissa bits, so each cast element is off by up to 2^-4 relative
(~2 % on average); a product's relative error (Frobenius norm) comes out near 3-5 % for random
matrices, whatever their size. 0.08 allows that and catches what would be wrong: a missing or
doubled scale (a factor of 2 or more), a wrong transpose (order 1). Each check also requires an
error above 1e-3, so a path that silently stayed in bf16 fails.
"""

from __future__ import annotations

import pytest
import torch

from integrations.fast_steps import fp8_base
from integrations.fast_steps.fp8_base import (
    E4M3,
    Fp8Weight,
    install_fp8_base,
    to_e4m3_rows,
    uninstall_fp8_base,
)

TOLERANCE = 0.08


def relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def fp8_close(approx, exact) -> bool:
    return 1e-3 < relative(approx, exact) < TOLERANCE


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def four_bit_layers(request):
    """Three bitsandbytes 4-bit layers (as Q, K, V of 64 features; K, V narrower), their dense
    matrices as the 4-bit dequantisation gives them, and the patch removed afterwards."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = torch.Generator().manual_seed(0)
    layers = torch.nn.ModuleList()
    for out_features in (64, 32, 32):
        layer = bnb.nn.Linear4bit(64, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True)
        weight = (torch.randn(out_features, 64, generator=generator) * 0.05).to(torch.bfloat16)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        layers.append(layer.to(device))  # quantises
    dense = [dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
             for layer in layers]
    yield layers, dense
    uninstall_fp8_base()


def test_rows_are_scaled_by_exact_powers_of_two():
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(32, 48, generator=generator)
         * torch.logspace(-4, 2, 32).unsqueeze(1)).to(torch.bfloat16)
    x8, inverse = to_e4m3_rows(x)
    assert x8.dtype == E4M3 and inverse.shape == (32, 1)
    exponents = torch.log2(inverse)
    assert torch.equal(exponents, exponents.round())  # powers of two: scaling adds no rounding
    restored = x8.float() * inverse
    assert (x8.float().abs().amax(dim=1) <= 448).all()
    # each row's largest element lands in the top binade: rows keep all of e4m3's precision
    assert (x8.float().abs().amax(dim=1) >= 224).all()
    # rounding: half a unit in e4m3's last place, 2^-4 relative for normal numbers, half its
    # subnormal spacing (2^-10 in scaled units) for the row's smallest elements
    assert ((restored - x.float()).abs() <= torch.maximum(x.float().abs() * 2**-4,
                                                          inverse * 2**-10)).all()


@pytest.mark.parametrize("mode", fp8_base.MODES)
def test_weight_stand_in_computes_every_product_the_kernels_use(four_bit_layers, mode):
    layers, dense = four_bit_layers
    assert install_fp8_base(layers, mode) == 3
    weight, W = layers[0].weight, dense[0]  # (64 out, 64 in)
    if mode == "cached":
        assert weight.data.untyped_storage().nbytes() <= 4  # the 4-bit bytes are released
    from axolotl.kernels import lora

    forward = lora.dequantize(weight.t(), weight.quant_state)  # as matmul_lora asks
    backward = lora.dequantize(weight, weight.quant_state)  # as the backward passes ask
    assert isinstance(forward, Fp8Weight) and forward.shape == (64, 64) and forward.transposed
    assert isinstance(backward, Fp8Weight) and not backward.transposed

    generator = torch.Generator().manual_seed(1)
    X = torch.randn(32, 64, generator=generator).to(W.device, torch.bfloat16)
    g = torch.randn(32, 64, generator=generator).to(W.device, torch.bfloat16)
    assert fp8_close(torch.matmul(X, forward), X @ W.t())
    assert fp8_close(X @ forward, X @ W.t())
    assert fp8_close(torch.mm(g, backward), g @ W)
    assert fp8_close(g @ forward.t(), g @ W)  # LoRA_O's backward: dY @ W_deq.t()
    acc = torch.ones(32, 64, dtype=torch.bfloat16, device=W.device)
    acc.addmm_(g, backward, alpha=2)
    assert fp8_close(acc - 1, 2 * (g @ W))
    # any other use gets the bf16 matrix (its e4m3 rounding aside)
    assert fp8_close(forward * 1, W.t()) and fp8_close(backward.sum(dim=0), W.sum(dim=0))
    # shapes _scaled_mm cannot take (rows not a multiple of 16) fall back to bf16
    assert fp8_close(X[:5] @ forward, X[:5] @ W.t())


def test_other_quantisation_states_still_reach_axolotls_dequantize(four_bit_layers):
    layers, _ = four_bit_layers
    install_fp8_base(layers[:1], "per_step")
    from axolotl.kernels import lora

    plain = torch.randn(8, 8)  # stays on the CPU: returned as it is
    assert lora.dequantize(plain, None) is plain  # no quantisation state: the tensor itself
    uninstall_fp8_base()
    from axolotl.kernels import quantize

    assert lora.dequantize is quantize.dequantize is fp8_base.REGISTRY.original or \
        lora.dequantize.__module__ == "axolotl.kernels.quantize"


def test_axolotls_lora_kernels_on_fp8_base_follow_the_bf16_ones(four_bit_layers):
    """LoRA_QKV and LoRA_O (forward and backward, scale 2) on the three 4-bit weights: with the
    FP8 base products, every output and gradient within the e4m3 tolerance of the bf16 ones."""
    from axolotl.kernels.lora import LoRA_O, LoRA_QKV

    layers, dense = four_bit_layers
    generator = torch.Generator().manual_seed(2)

    device = dense[0].device

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, torch.bfloat16)

    X = tensor(2, 32, 64).requires_grad_()
    lora_ab = [(tensor(8, 64, scale=0.1).requires_grad_(), tensor(o, 8, scale=0.1).requires_grad_())
               for o in (64, 32, 32)]
    params = [p for ab in lora_ab for p in ab]

    def run(weights, quants):
        for p in [X, *params]:
            p.grad = None
        args = []
        for W, Q, (A, B) in zip(weights, quants, lora_ab, strict=True):
            args += [W, None, Q, A, B, 2.0, None, None]
        Q_, K_, V_ = LoRA_QKV.apply(X, None, *args, True)
        O_ = LoRA_O.apply(Q_, None, weights[0], None, quants[0], *lora_ab[0], 2.0, None, None)
        ((O_ * torch.linspace(-1, 1, 64, device=device)).sum() + (K_ ** 2).sum() + V_.sum()).backward()
        return [t.detach().clone() for t in (Q_, K_, V_, O_, X.grad, *(p.grad for p in params))]

    reference = run(dense, (None, None, None))  # the dense matrices: the bf16 path as today
    install_fp8_base(layers, "cached")
    fp8 = run([layer.weight for layer in layers], [layer.weight.quant_state for layer in layers])
    names = ["Q", "K", "V", "O", "dX", "dA_q", "dB_q", "dA_k", "dB_k", "dA_v", "dB_v"]
    errors = {n: relative(a, b) for n, a, b in zip(names, fp8, reference, strict=True)}
    assert max(errors.values()) < TOLERANCE, errors
    assert errors["Q"] > 1e-3 and errors["dX"] > 1e-3, errors  # the FP8 path really ran
