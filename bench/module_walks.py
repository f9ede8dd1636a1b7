"""What the Trainer's per-step walks over a QLoRA Mistral-7B's module tree cost the host.

    python -m bench.module_walks [--repeats 20] [--json FILE]

Builds Mistral-7B-v0.1's module tree with peft LoRA (r 32, all seven projections) on the meta
device (no memory, no weights), then times each walk the transformers Trainer makes at every
step (`model.train()`, accelerate's compiled-region check in `unwrap_model`, `num_parameters`
for the FLOP count, `parameters()` for the gradient clipping, `zero_grad()`) and the same calls
with integrations/fast_steps/module_walks.py installed. Host time only: the GPU waits through it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import cpu_model
from integrations.fast_steps.module_walks import (
    cache_results,
    remember_train_mode,
    trainable_parameters,
    zero_grad_of,
)


def mistral_7b_lora() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=targets))


def milliseconds(call, repeats: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return round((time.perf_counter() - start) / repeats * 1e3, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    from accelerate.utils.other import has_compiled_regions

    torch.set_num_threads(1)
    model = mistral_7b_lora()
    walks = {
        "train()": lambda: model.train(),
        "unwrap_model (has_compiled_regions)": lambda: has_compiled_regions(model),
        "num_parameters(exclude_embeddings=True)":
            lambda: model.num_parameters(exclude_embeddings=True),
        "parameters() for clip_grad_norm_": lambda: list(model.parameters()),
        "zero_grad()": lambda: model.zero_grad(),
    }
    plain = {name: milliseconds(call, args.repeats) for name, call in walks.items()}
    remember_train_mode(model)
    cache_results(model, "num_parameters")
    params = trainable_parameters(model)
    accelerator = SimpleNamespace(unwrap_model=has_compiled_regions)  # the walk it caches
    cache_results(accelerator, "unwrap_model")
    lean_calls = {
        "train()": lambda: model.train(),
        "unwrap_model (has_compiled_regions)": lambda: accelerator.unwrap_model(model),
        "num_parameters(exclude_embeddings=True)":
            lambda: model.num_parameters(exclude_embeddings=True),
        "parameters() for clip_grad_norm_": params,
        "zero_grad()": zero_grad_of(params),
    }
    lean = {name: milliseconds(call, args.repeats) for name, call in lean_calls.items()}
    result = {"modules": sum(1 for _ in model.modules()),
              "parameters": sum(1 for _ in model.parameters()),
              "cpu": cpu_model(), "python": platform.python_version(),
              "torch": torch.__version__, "threads": 1, "repeats": args.repeats,
              "ms_per_call": {"walked": plain, "lean": lean},
              "ms_per_step": {"walked": round(sum(plain.values()), 2),
                              "lean": round(sum(lean.values()), 2)}}
    print(f"{result['modules']} modules, {result['parameters']} parameters")
    for name in walks:
        print(f"{name:42s} {plain[name]:8.3f} ms  ->  {lean[name]:8.3f} ms")
    print(f"{'per step':42s} {result['ms_per_step']['walked']:8.2f} ms  ->  "
          f"{result['ms_per_step']['lean']:8.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
