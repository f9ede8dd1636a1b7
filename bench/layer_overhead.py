"""Host work per training step of a deep, narrow QLoRA model: eager against compiled layers.

Usage:
    python -m bench.layer_overhead [--layers 32] [--tokens 64] [--steps 10] [--out FILE.json]

A model with Mistral-7B's depth (32 layers) but a width of 64 does almost no arithmetic, so the
CPU time of one forward+backward is the Python and dispatch work that makes the real 7B step
host-bound on a GPU: peft's LoRA layers, bitsandbytes' 4-bit layers (its CPU path), the norms,
RoPE and autograd. It runs the same steps eagerly and with `fast_steps_compile`'s compiled
layers (integrations/fast_steps/compiled_layers.py) and prints the median process CPU time per
step of each (CPU time, not wall time, so other processes on the machine do not move it) and
dynamo's report. A proxy, not the GPU figure: GPU launches and Triton's launcher are not in it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import cpu_model


def build(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 quantization_config=quantization,
                                                 attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules="all-linear")).train()


def cpu_seconds_per_step(model, ids: torch.Tensor, warmup: int, steps: int) -> float:
    times = []
    for step in range(warmup + steps):
        start = time.process_time()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import MistralConfig, MistralForCausalLM

    from integrations.fast_steps.compiled_layers import CompiledLayers, compile_report

    torch.set_num_threads(1)  # one core: the measure is Python work, not parallel arithmetic
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=1000,
                           num_hidden_layers=args.layers)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    with tempfile.TemporaryDirectory() as folder:
        MistralForCausalLM(config).save_pretrained(folder)
        eager = cpu_seconds_per_step(build(Path(folder)), ids, 3, args.steps)
        model = build(Path(folder))
        CompiledLayers().install(model)
        compiled = cpu_seconds_per_step(model, ids, 3, args.steps)
    result = {
        "what": f"CPU time per forward+backward, {args.layers} QLoRA layers of width 64, "
                f"{args.tokens} tokens, median of {args.steps} steps",
        "eager_ms": round(1000 * eager, 1), "compiled_ms": round(1000 * compiled, 1),
        "compiled_vs_eager": round(compiled / eager, 3), "dynamo": compile_report(),
        "cpu": cpu_model(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
