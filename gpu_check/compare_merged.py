"""The merged model against what was evaluated (base + adapter), on held-out text.

    python -m gpu_check.compare_merged --model BASE --run RUN_DIR --merged MERGED_DIR \
        --data HELD_OUT.jsonl --json OUT.json [--rows 8] [--max-tokens 256] [--load-in-4bit]

gpu-check's `merged_logits` stage. `axolotl merge-lora` stores base + scale * B @ A rounded to its
dtype (bf16 on a GPU). The merge is right when every LoRA layer's stored weight is that sum up to
the rounding (the allowance covers fp32 summation order), and the merged model keeps the
adapter's gain in held-out loss. Logit and top-1 differences are reported, not judged: when the
LoRA change is small next to the weight (a short run), bf16 storage rounds part of it away and
the logits move with it. Writes the figures to --json and prints them; exit status 0 (the
verdict is the JSON's `ok`, which gpu-check reads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from core.errors import cli
from core.files import write_json

MERGED_ROUNDING_ALLOWANCE = 1.05  # mean |merged - (base + delta)| <= this x the rounding's own
MERGED_GAIN_KEPT_MIN = 0.95  # (base loss - merged loss) / (base loss - adapter loss)
MERGED_NLL_TOLERANCE = 0.01  # without a gain to keep: relative held-out loss difference


def merged_weight_check(model, merged_dir: Path) -> dict:
    """Every LoRA layer's weight in the merged checkpoint against the weight the evaluated model
    computes with: its base weight (dequantised when 4-bit) plus scale * B @ A, in fp32. Tells a
    merge that adds the wrong thing from the rounding of a right sum to the stored dtype."""
    from safetensors import safe_open

    layers, missing = [], []
    with contextlib.ExitStack() as files:  # each shard opened once, read tensor by tensor
        handles = {}
        for file in sorted(Path(merged_dir).glob("*.safetensors")):
            handle = files.enter_context(safe_open(file, "pt"))
            handles.update(dict.fromkeys(handle.keys(), handle))
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            key = name.split("base_model.model.", 1)[-1] + ".weight"
            if key not in handles:
                missing.append(key)
                continue
            weight = module.base_layer.weight
            if weight.__class__.__name__ == "Params4bit":
                import bitsandbytes.functional as bnb_functional

                base = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
            else:
                base = weight.detach().float()
            # in fp32 from the fp32 copies (peft's get_delta_weight keeps bf16 LoRA weights' dtype)
            delta = module.scaling["default"] * (module.lora_B["default"].weight.detach().float()
                                                 @ module.lora_A["default"].weight.detach().float())
            stored = handles[key].get_tensor(key).to(base.device)
            merged, expected = stored.float(), base + delta
            rounding = float((expected.to(stored.dtype).float() - expected).abs().mean())
            error = float((merged - expected).abs().mean())
            allowed = MERGED_ROUNDING_ALLOWANCE * rounding + 1e-6 * float(expected.abs().mean())
            delta_mean = float(delta.abs().mean())
            layers.append({
                "layer": key, "stored_dtype": str(stored.dtype).removeprefix("torch."),
                "error_mean_abs": error, "rounding_mean_abs": rounding, "ok": error <= allowed,
                "delta_mean_abs": delta_mean, "base_mean_abs": float(base.abs().mean()),
                # how much of the LoRA change the stored weights miss (rounding included)
                "delta_missed_pct": 100 * float(((merged - base) - delta).abs().mean())
                / max(delta_mean, 1e-30),
            })
    worst = max(layers, key=lambda r: r["error_mean_abs"] / max(r["rounding_mean_abs"], 1e-30),
                default=None)
    return {
        "layers": len(layers), "missing": missing,
        "ok": bool(layers) and not missing and all(r["ok"] for r in layers),
        "layers_over_rounding": [r["layer"] for r in layers if not r["ok"]][:10],
        "stored_dtype": layers[0]["stored_dtype"] if layers else None,
        "delta_missed_pct_mean": (sum(r["delta_missed_pct"] for r in layers) / len(layers)
                                  if layers else None),
        "delta_vs_base_mean": (sum(r["delta_mean_abs"] / r["base_mean_abs"] for r in layers)
                               / len(layers) if layers else None),
        "worst": worst,
    }


def merged_verdict(weights: dict, loss_ok: bool, gain_kept, nll_merged: float,
                   nll_adapter: float) -> str:
    if not weights["ok"]:
        where = weights["missing"][:3] or weights["layers_over_rounding"][:3]
        return (f"merged weights are not base + adapter (beyond {weights['stored_dtype']} "
                f"rounding) in {', '.join(where) or 'no LoRA layer found'}")
    losses = f"held-out loss {nll_merged:.4f} merged vs {nll_adapter:.4f} base + adapter"
    if not loss_ok:
        return f"merged weights right, but the merged model lost the adapter's gain: {losses}"
    kept = f", {100 * gain_kept:.1f} % of the adapter's gain kept" if gain_kept is not None else ""
    return (f"merged weights = base + adapter up to {weights['stored_dtype']} rounding in all "
            f"{weights['layers']} LoRA layers; {losses}{kept}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpu_check.compare_merged",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--run", type=Path, required=True, help="the adapter's run directory")
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    return parser.parse_args(argv)


def logits_of(model, rows: list[list[int]], device) -> list:
    """Each row's logits (fp32, on the CPU), one row at a time."""
    import torch

    out = []
    with torch.inference_mode():
        for ids in rows:
            x = torch.tensor([ids], device=device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def mean_nll(logits_list: list, rows: list[list[int]]) -> float:
    """Token-weighted next-token loss of the rows under the given logits."""
    import torch

    total, count = 0.0, 0
    for logits, ids in zip(logits_list, rows, strict=True):
        target = torch.tensor(ids[1:])
        total += float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))
        count += len(ids) - 1
    return total / count


def abs_diff_stats(pairs) -> tuple[float, float]:
    """(max, mean) of |x - y| over all positions, one row at a time."""
    top, total, count = 0.0, 0.0, 0
    for x, y in pairs:
        d = (x - y).abs()
        top, total, count = max(top, float(d.max())), total + float(d.sum()), count + d.numel()
    return top, total / count


def score_models(args) -> tuple[list, dict, list, list, list, object]:
    """(rows, weight check, logits of base + adapter, of the base, of the merged model, dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    from eval.common import (
        base_model_context,
        encode,
        load_model,
        load_tokenizer,
        quiet_library_logs,
        read_texts,
        resolve_device,
    )

    quiet_library_logs()
    device, dtype = resolve_device(args.load_in_4bit)
    tok = load_tokenizer(args.model)
    rows = [ids[: args.max_tokens] for ids in
            encode(tok, read_texts(args.data)[: args.rows])[0] if len(ids) > 1]
    model = load_model(args.model, args.run, load_in_4bit=args.load_in_4bit)
    adapter = logits_of(model, rows, device)
    weights = merged_weight_check(model, args.merged)
    with base_model_context(model):
        base = logits_of(model, rows, device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    placement = {"device_map": {"": 0}} if device.type == "cuda" else {}
    merged_model = AutoModelForCausalLM.from_pretrained(str(args.merged), dtype=dtype, **placement)
    merged_model.to(device).eval()
    return rows, weights, adapter, base, logits_of(merged_model, rows, device), dtype


def compare(args) -> dict:
    """The comparison's figures and verdict (see the module docstring)."""
    started = time.perf_counter()
    rows, weights, adapter, base, merged, dtype = score_models(args)
    diff_max, diff_mean = abs_diff_stats(zip(merged, adapter, strict=True))
    effect_max, effect_mean = abs_diff_stats(zip(adapter, base, strict=True))
    agree = sum(int((m.argmax(-1) == a.argmax(-1)).sum())
                for m, a in zip(merged, adapter, strict=True))
    nll_merged, nll_adapter, nll_base = (mean_nll(merged, rows), mean_nll(adapter, rows),
                                         mean_nll(base, rows))
    rel = abs(nll_merged - nll_adapter) / nll_adapter
    gain = nll_base - nll_adapter
    gain_kept = (nll_base - nll_merged) / gain if gain > 0 else None
    loss_ok = gain_kept >= MERGED_GAIN_KEPT_MIN if gain_kept is not None else (
        rel <= MERGED_NLL_TOLERANCE)
    return {
        "rows": len(rows), "tokens": sum(len(r) for r in rows),
        "base_as_evaluated": "nf4 (4-bit) + adapter" if args.load_in_4bit else
        f"{str(dtype).removeprefix('torch.')} + adapter",
        "merged_dtype": str(dtype).removeprefix("torch."),
        "nll_merged": nll_merged, "nll_adapter": nll_adapter, "nll_base": nll_base,
        "nll_rel_diff_pct": 100 * rel,
        "max_abs_logit_diff": diff_max, "mean_abs_logit_diff": diff_mean,
        "adapter_effect_max_abs": effect_max, "adapter_effect_mean_abs": effect_mean,
        "top1_agreement": agree / sum(len(r) for r in rows), "loss_gain_kept": gain_kept,
        "weights": weights,
        "seconds": round(time.perf_counter() - started, 1),
        "ok": weights["ok"] and loss_ok,
        "verdict": merged_verdict(weights, loss_ok, gain_kept, nll_merged, nll_adapter),
    }


def run(argv=None) -> int:
    args = parse_args(argv)
    result = compare(args)
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


main = cli(run, prog="compare_merged")


if __name__ == "__main__":
    raise SystemExit(main())
