"""The peer a user could install instead: Unsloth's QLoRA on the same model, LoRA and data.

Usage (on a CUDA machine with unsloth and unsloth-zoo installed):
    python -m bench.unsloth_peer --model /tmp/mistral-7b-random --steps 23 \
        --gradient-checkpointing false|unsloth [--train-jsonl data/prepared/clean/train.jsonl]

What it runs is Unsloth's documented recipe with the repository recipe's settings where the two
overlap: `FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bf16, max_seq_length=4096)`,
`FastLanguageModel.get_peft_model(r=32, lora_alpha=64, lora_dropout=0, bias="none", all seven
projections, use_gradient_checkpointing=...)`, TRL's `SFTTrainer` packing the passages into
rows of up to 4,096 tokens, batch 1, no gradient accumulation, bf16, torch's fused AdamW,
lr 2e-4 cosine with 10 % warm-up, seed 42, on the recipe's training passages. bench.step_recorder
writes the same per-step records as for the other variants (BENCH_STEPS_JSONL); one `unsloth`
line on stdout names the attention Unsloth used and the tokens it packed per row.
"""

from __future__ import annotations

import os

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # it would fetch a README from the hub

import argparse  # noqa: E402 - unsloth must be imported before transformers, trl and peft
import json  # noqa: E402
from pathlib import Path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--gradient-checkpointing", choices=("false", "unsloth", "true"),
                        default="false")
    parser.add_argument("--train-jsonl", type=Path,
                        default=Path("data/prepared/clean/train.jsonl"))
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/unsloth-peer"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import unsloth  # noqa: F401 - patches transformers/trl/peft on import
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from bench.common import ENV_STEPS_PATH
    from bench.flops import DecoderShape
    from bench.step_recorder import StepRecorder

    checkpointing = {"false": False, "true": True, "unsloth": "unsloth"}[
        args.gradient_checkpointing]
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(args.model), max_seq_length=args.max_length, dtype=torch.bfloat16,
        load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=32, lora_alpha=64, lora_dropout=0.0, bias="none", target_modules=TARGETS,
        use_gradient_checkpointing=checkpointing, random_state=42)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_dataset("json", data_files=str(args.train_jsonl), split="train")
    config = SFTConfig(
        output_dir=str(args.output_dir), dataset_text_field="text", packing=True,
        max_length=args.max_length, per_device_train_batch_size=1,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", bf16=True, logging_steps=1, save_strategy="no",
        report_to="none", seed=42, dataset_num_proc=1, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                         args=config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = os.environ.get(ENV_STEPS_PATH)
    if out:
        StepRecorder(out, DecoderShape.from_config(base.config),
                     gradient_checkpointing=bool(checkpointing),
                     label=os.environ.get("BENCH_LABEL", "unsloth")).attach(trainer)
    rows = trainer.train_dataset
    lengths = [len(ids) for ids in rows["input_ids"]] if "input_ids" in rows.column_names else []
    print("unsloth " + json.dumps({
        "unsloth": getattr(unsloth, "__version__", None),
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "gradient_checkpointing": args.gradient_checkpointing,
        "packed_rows": len(lengths),
        "tokens_per_row_mean": sum(lengths) / len(lengths) if lengths else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }), flush=True)
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
