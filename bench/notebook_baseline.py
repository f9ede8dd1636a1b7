"""The original notebook's QLoRA method, written plainly with transformers + peft + bitsandbytes.

Usage (normally started by `python -m bench.train_throughput`, which sets the output path):
    BENCH_STEPS_JSONL=/tmp/nb/steps.jsonl python -m bench.notebook_baseline \
        --model /tmp/mistral-7b-random --steps 13 [--compute-dtype fp16|bf16|fp32] [--no-4bit]

What the notebook did, and what this does: load the model in 4-bit NF4 with double
quantisation (compute dtype fp16; `--compute-dtype bf16` to compare), run peft's
`prepare_model_for_kbit_training` (casts the non-quantised weights to fp32 and turns on
gradient checkpointing), add LoRA r=32, alpha=64, dropout 0.05 on q_proj and v_proj, and train
with the HF Trainer (fp16 mixed precision, paged 8-bit AdamW, lr 2e-5, batch 2 rows padded to
the longer row, no packing) on the CSV-style chunks (`data/prepared/seed/train.jsonl`, one row
per chunk, ~230 tokens). Every optimizer step is recorded by bench.step_recorder. After
training, one forward-only pass over `--eval-jsonl` is timed (tokens/s of scoring with this
4-bit model plus adapter) and written as an `eval_forward` record.

`--no-4bit` and `--compute-dtype fp32` exist for CPU tests only.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from core.errors import UserError, cli
from core.files import read_text_rows

LOG = logging.getLogger("bench.notebook_baseline")

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: missing; run `python -m data_prep --mode seed` (or clean) first")
    texts = read_text_rows(path)
    if not texts:
        raise UserError(f"{path}: no rows")
    return texts


def load_notebook_model(model_dir: Path, compute_dtype: str, four_bit: bool):
    """4-bit NF4 + double quant model, prepared for k-bit training, with the notebook's LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, DTYPES[compute_dtype])
    kwargs = {}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model = prepare_model_for_kbit_training(model)  # fp32 norms/embeddings/lm_head + grad ckpt
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def time_eval_forward(model, tokenizer, texts: list[str], batch_size: int, max_length: int,
                      device) -> dict:
    """Forward-only scoring pass (loss over all real tokens), timed with synchronisation."""
    import torch

    model.eval()
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    cuda = device.type == "cuda"
    tokens = 0
    with torch.no_grad():
        for warm in (True, False):  # one warm-up batch, then the timed pass over everything
            batches = [encoded[:batch_size]] if warm else [
                encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            for batch in batches:
                padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(device)
                labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
                model(**padded, labels=labels, use_cache=False)
                if not warm:
                    tokens += int(padded["attention_mask"].sum())
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
    return {"event": "eval_forward", "rows": len(encoded), "batch_size": batch_size,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (bf16 weights)")
    parser.add_argument("--train-jsonl", type=Path, default=Path("data/prepared/seed/train.jsonl"))
    parser.add_argument("--eval-jsonl", type=Path, default=Path("data/prepared/clean/eval.jsonl"),
                        help="rows for the timed forward-only pass ('' to skip)")
    parser.add_argument("--steps", type=int, default=13, help="optimizer steps in total")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=512, help="truncate rows to this")
    parser.add_argument("--compute-dtype", choices=sorted(DTYPES), default="fp16",
                        help="bnb 4-bit compute dtype and Trainer mixed precision (notebook: fp16)")
    parser.add_argument("--optim", default="paged_adamw_8bit")
    parser.add_argument("--no-4bit", action="store_true", help="CPU tests: skip quantisation")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps-jsonl", default=os.environ.get("BENCH_STEPS_JSONL"),
                        help="per-step records (default: $BENCH_STEPS_JSONL)")
    args = parser.parse_args(argv)
    if not args.steps_jsonl:
        parser.error("--steps-jsonl or $BENCH_STEPS_JSONL is required")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.model / "config.json").is_file():
        raise UserError(f"--model {args.model}: no config.json; build it with "
                        "`python -m bench.build_random_mistral --out DIR`")

    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from bench.flops import DecoderShape
    from bench.step_recorder import StepRecorder

    texts = read_texts(args.train_jsonl)
    eval_texts = read_texts(Path(args.eval_jsonl)) if str(args.eval_jsonl) else []
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.eos_token  # as the notebook: Mistral has no pad token
    tokenizer.padding_side = "right"
    train_rows = [tokenizer(t, truncation=True, max_length=args.max_length) for t in texts]

    torch.manual_seed(args.seed)
    model = load_notebook_model(args.model, args.compute_dtype, four_bit=not args.no_4bit)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-notebook-") as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            learning_rate=args.lr,
            optim=args.optim,
            fp16=cuda and args.compute_dtype == "fp16",
            bf16=cuda and args.compute_dtype == "bf16",
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_rows,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
        recorder = StepRecorder(
            args.steps_jsonl,
            shape=DecoderShape.from_config(model.get_base_model().config),
            gradient_checkpointing=model.get_base_model().is_gradient_checkpointing,
            label="notebook",
        ).attach(trainer)
        trainer.train()
    if eval_texts:
        record = time_eval_forward(model, tokenizer, eval_texts, args.eval_batch_size,
                                   args.max_length, next(model.parameters()).device)
        recorder.write(record)
        print(f"eval forward: {record['tokens']} tokens in {record['seconds']:.2f} s = "
              f"{record['tokens_per_s']:,.0f} tokens/s")
    print(f"notebook baseline: {args.steps} steps -> {recorder.out_path}")
    return 0


main = cli(run, prog="bench.notebook_baseline")


if __name__ == "__main__":
    raise SystemExit(main())
