"""Check a saved LoRA adapter against the shapes a Mistral-7B recipe should produce, and load it.

Usage:
    python -m bench.check_adapter ADAPTER_DIR --model MODEL_DIR [--out result.json]

Reads adapter_config.json and adapter_model.safetensors, compares every lora_A/lora_B shape with
what the base model's config implies for the configured rank, then loads the adapter onto the
base model with peft (bf16, GPU if present) and runs one forward pass. Used after the FSDP2 run to
show that the sharded run saved an ordinary, loadable PEFT adapter. Exit 1 on any mismatch, 2
when there is no adapter to check (core/errors.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import EXIT_FAILED, EXIT_OK, UserError, cli
from core.files import write_file
from core.runs import ADAPTER_CONFIG


def expected_shapes(config, rank: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """(lora_A shape, lora_B shape) per target module name, from the base model's config."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return {name: ((rank, d_in), (d_out, rank)) for name, (d_in, d_out) in dims.items()}


def check(adapter_dir: Path, model_dir: Path) -> dict:
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config = AutoConfig.from_pretrained(model_dir)
    rank = adapter_config["r"]
    expected = expected_shapes(config, rank)
    problems, tensors = [], 0
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open is not iterable
            if ".lora_A." not in name and ".lora_B." not in name:
                continue  # modules_to_save copies (e.g. lm_head) are full tensors
            module = name.split(".lora_")[0].rsplit(".", 1)[-1]
            which = 0 if ".lora_A." in name else 1
            shape = tuple(weights.get_slice(name).get_shape())
            tensors += 1
            if module in expected and shape != expected[module][which]:
                problems.append(f"{name}: {shape} != {expected[module][which]}")
    targets = sorted(set(adapter_config["target_modules"]))
    want_tensors = 2 * len(targets) * config.num_hidden_layers
    if tensors != want_tensors:
        problems.append(f"{tensors} LoRA tensors, expected {want_tensors}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 22557, 1526]], device=device)).logits
    return {
        "adapter": str(adapter_dir), "r": rank, "lora_alpha": adapter_config["lora_alpha"],
        "target_modules": targets, "lora_tensors": tensors, "expected_tensors": want_tensors,
        "shapes_ok": not problems, "problems": problems[:10],
        "loads_with_peft": True, "forward_finite": bool(torch.isfinite(logits).all()),
    }


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--model", type=Path, required=True, help="base model directory")
    parser.add_argument("--out", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if not (args.adapter / ADAPTER_CONFIG).is_file():
        raise UserError(f"{args.adapter}: no {ADAPTER_CONFIG} (did the run save?)")
    result = check(args.adapter, args.model)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_file(args.out, text + "\n")
    return EXIT_OK if result["shapes_ok"] and result["forward_finite"] else EXIT_FAILED


main = cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
