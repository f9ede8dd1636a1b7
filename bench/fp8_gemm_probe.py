"""How much of the recipe's step FP8 matrix products could save: time Mistral-7B's frozen base
projections (forward y = x W^T and backward dx = dy W for one 4,096-token micro-batch) in bf16
and as FP8 `torch._scaled_mm` (per-tensor and per-row scales), with the casts they need, and
print the per-step totals over 32 decoder layers as JSON lines.

The recipe spends most of its GPU time in these products (bf16, after bitsandbytes dequantises
the 4-bit weights); Hopper's FP8 tensor cores run twice the bf16 rate on paper. This answers
whether that survives the casts before anything is built on it. Needs a GPU with FP8 (sm_89+).

    python -m bench.fp8_gemm_probe [--tokens 4096] [--iters 20] [--out fp8_probe.jsonl]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

LOG = logging.getLogger("fp8_gemm_probe")

LAYERS = 32
# (name, out_features, in_features, how many per decoder layer) for Mistral-7B
PROJECTIONS = [
    ("q/o", 4096, 4096, 2),
    ("k/v", 1024, 4096, 2),
    ("gate/up", 14336, 4096, 2),
    ("down", 4096, 14336, 1),
]
E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = torch.finfo(E4M3).max
E5M2_MAX = torch.finfo(E5M2).max


def time_ms(fn, iters: int) -> float:
    """Median GPU time of fn() in milliseconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def to_fp8_tensorwise(t: torch.Tensor, dtype=E4M3):
    """t scaled by one factor so its largest magnitude is the format's largest, cast to FP8."""
    fmax = E4M3_MAX if dtype == E4M3 else E5M2_MAX
    scale = fmax / t.abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).to(dtype), scale.reciprocal()


def to_fp8_rowwise(t: torch.Tensor):
    """t scaled row by row (one factor per row), cast to e4m3; returns the inverse scales [rows, 1]."""
    scale = E4M3_MAX / t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    return (t.float() * scale).to(E4M3), scale.reciprocal()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def probe_projection(tokens: int, out_f: int, in_f: int, iters: int) -> dict:
    dev = "cuda"
    x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(tokens, out_f, device=dev, dtype=torch.bfloat16) * 1e-3
    w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * in_f**-0.5

    rec = {}
    rec["bf16_fwd_ms"] = time_ms(lambda: x @ w.t(), iters)
    rec["bf16_bwd_ms"] = time_ms(lambda: dy @ w, iters)
    y_ref, dx_ref = x @ w.t(), dy @ w

    # per-tensor scales: weights cast once (frozen), activations/gradients every call
    w8, w_inv = to_fp8_tensorwise(w)
    w8_t = w8.t().contiguous()  # [in, out] row-major: the backward's column-major operand
    one = torch.ones((), device=dev)

    def fwd_tensorwise():
        x8, x_inv = to_fp8_tensorwise(x)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16)

    def bwd_tensorwise():
        dy8, dy_inv = to_fp8_tensorwise(dy, E5M2)
        return torch._scaled_mm(dy8, w8_t.t(), scale_a=dy_inv, scale_b=w_inv, out_dtype=torch.bfloat16)

    x8, x_inv = to_fp8_tensorwise(x)
    rec["fp8_gemm_only_fwd_ms"] = time_ms(
        lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16),
        iters,
    )
    rec["cast_x_ms"] = time_ms(lambda: to_fp8_tensorwise(x), iters)
    rec["cast_w_ms"] = time_ms(lambda: to_fp8_tensorwise(w), iters)
    rec["transpose_w8_ms"] = time_ms(lambda: w8.t().contiguous(), iters)
    rec["fp8_tensorwise_fwd_ms"] = time_ms(fwd_tensorwise, iters)
    rec["fp8_tensorwise_bwd_ms"] = time_ms(bwd_tensorwise, iters)
    rec["fp8_tensorwise_fwd_rel_err"] = relative_error(fwd_tensorwise(), y_ref)
    rec["fp8_tensorwise_bwd_rel_err"] = relative_error(bwd_tensorwise(), dx_ref)
    del one

    # per-row scales (x rows, weight rows), e4m3 both ways
    w8r, w_inv_r = to_fp8_rowwise(w)
    w8r_t, w_inv_rt = to_fp8_rowwise(w.t().contiguous())

    def fwd_rowwise():
        x8r, x_inv_r = to_fp8_rowwise(x)
        return torch._scaled_mm(
            x8r, w8r.t(), scale_a=x_inv_r, scale_b=w_inv_r.t(), out_dtype=torch.bfloat16
        )

    def bwd_rowwise():
        dy8r, dy_inv_r = to_fp8_rowwise(dy)
        return torch._scaled_mm(
            dy8r, w8r_t.t(), scale_a=dy_inv_r, scale_b=w_inv_rt.t(), out_dtype=torch.bfloat16
        )

    try:
        rec["fp8_rowwise_fwd_ms"] = time_ms(fwd_rowwise, iters)
        rec["fp8_rowwise_bwd_ms"] = time_ms(bwd_rowwise, iters)
        rec["fp8_rowwise_fwd_rel_err"] = relative_error(fwd_rowwise(), y_ref)
        rec["fp8_rowwise_bwd_rel_err"] = relative_error(bwd_rowwise(), dx_ref)
    except RuntimeError as exc:  # older torch/cuBLAS without row-wise scaling
        rec["fp8_rowwise_error"] = str(exc).splitlines()[0]
    rec["bf16_fwd_rel_err_vs_fp32"] = relative_error(y_ref, x.float() @ w.float().t())
    return rec


def probe_dequant(iters: int) -> dict:
    """bitsandbytes' nf4 -> bf16 dequantisation of the largest projection, and nf4 -> e4m3."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        return {"dequant_error": str(exc)}
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 4096**-0.5
    q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    rec = {"nf4_dequant_gate_ms": time_ms(lambda: bnbf.dequantize_4bit(q, state), iters)}
    rec["nf4_dequant_then_e4m3_gate_ms"] = time_ms(
        lambda: to_fp8_tensorwise(bnbf.dequantize_4bit(q, state)), iters
    )
    return rec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        LOG.error("fp8_gemm_probe: no CUDA GPU; run it on a GPU with FP8 tensor cores (sm_89+)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    lines = []
    totals: dict[str, float] = {}
    for name, out_f, in_f, count in PROJECTIONS:
        rec = probe_projection(args.tokens, out_f, in_f, args.iters)
        rec.update(projection=name, out_features=out_f, in_features=in_f, per_layer=count)
        lines.append(rec)
        for key, value in rec.items():
            if key.endswith("_ms"):
                totals[key] = totals.get(key, 0.0) + value * count * LAYERS
    flops = sum(2 * args.tokens * o * i * c * LAYERS for _, o, i, c in PROJECTIONS)
    summary = {"per_step_ms_over_32_layers": {k: round(v, 2) for k, v in totals.items()}}
    summary["gemm_tflop_per_pass"] = round(flops / 1e12, 2)
    summary["bf16_fwd_tflops"] = round(flops / totals["bf16_fwd_ms"] / 1e9, 1)
    summary["fp8_gemm_only_fwd_tflops"] = round(flops / totals["fp8_gemm_only_fwd_ms"] / 1e9, 1)
    summary.update(probe_dequant(args.iters))
    summary["device"] = torch.cuda.get_device_name()
    summary["torch"] = torch.__version__
    lines.append(summary)
    text = "\n".join(json.dumps(line) for line in lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
