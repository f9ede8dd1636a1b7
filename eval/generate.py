"""Generations of the base model and its LoRA adapter side by side, with a memorisation check.

Usage:
    python -m eval.generate --model models/tiny-mistral --adapter outputs/tiny-mistral-cpu \
        --train data/prepared/clean/train.jsonl
    python -m eval.generate [--model PATH_OR_HUB_ID] [--adapter DIR] [--prompt TEXT ...]
        [--max-new-tokens 60] [--temperature 0.8] [--top-p 0.95] [--seed 0] [--samples 1]
        [--train FILE | --no-memorisation] [--load-in-4bit] [--eos-token T] [--out DIR]

For every prompt, each model (base = adapter disabled, and base+adapter) writes one greedy
continuation and --samples sampled ones; sample i of every model uses seed --seed + i, so base
and adapter draw with the same seed. A prompt that ends in whitespace is also run with the
whitespace stripped: BPE tokenizers (SmolLM2's) turn a trailing space into its own odd token,
which derails some models; both variants are shown, the prompt exactly as given.

Memorisation check: the share of a generation's word 8-grams that occur verbatim in the
training text (--train, JSONL rows joined in file order, or plain text). Words are normalised
before matching: Unicode NFKC, lower case, curly quotes made straight, then a word is a run of
letters/digits with inner apostrophes kept ("don't" is one word); all other punctuation,
underscores (Gutenberg's _italics_) and dashes separate words. Only the generated continuation
is checked, not the prompt. A generation with fewer than 8 words has no 8-grams: its share is
None (shown "n/a"), not 0. A share near 1 means the model copies Shelley; near 0, it writes its
own sentences (in whatever style).

Outputs: OUT/generations.json and OUT/generations.md, OUT = --out, else ADAPTER/eval/, else
outputs/eval/ (written atomically after all generations are done).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import time
import unicodedata
from pathlib import Path

from data_prep.prepare import sha256_of
from eval.common import (
    DEFAULT_TRAIN_DATA,
    GENERATIONS_JSON,
    EvalError,
    base_model_context,
    default_out_dir,
    encode,
    library_versions,
    load_model,
    load_tokenizer,
    md_escape,
    model_device,
    quiet_library_logs,
    read_texts,
    resolve_device,
    resolve_model_arg,
    run_main,
    setup_logging,
    utc_timestamp,
    write_files_atomic,
)

LOG = logging.getLogger("eval.generate")

NGRAM = 8
DEFAULT_PROMPTS = (
    "I'm afraid I've created a ",  # the original notebook's prompt, trailing space included
    "It was on a dreary night of November that",  # Chapter 5's opening: does it copy?
    "My dear Elizabeth,",
    "The ice around the ship",
    "The best way to learn a new programming language is",  # not Shelley's world at all
)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def normalise_words(text: str) -> list[str]:
    """Words for the 8-gram match; see the module docstring."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    return _WORD.findall(text)


def word_ngrams(words: list[str], n: int = NGRAM) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


class TrainingIndex:
    """Every word 8-gram of the training text."""

    def __init__(self, texts: list[str], n: int = NGRAM):
        self.n = n
        words = [w for text in texts for w in normalise_words(text)]
        self.ngrams = set(word_ngrams(words, n))
        self.n_words = len(words)

    def share(self, text: str) -> dict:
        """Share of `text`'s word n-grams found verbatim in the training text (None if < n words)."""
        grams = word_ngrams(normalise_words(text), self.n)
        copied = sum(1 for g in grams if g in self.ngrams)
        return {
            "n_words": len(normalise_words(text)),
            "n_ngrams": len(grams),
            "n_copied": copied,
            "share": copied / len(grams) if grams else None,
        }


def prompt_variants(prompts: list[str]) -> list[tuple[str, str]]:
    """(prompt, variant label): each prompt as given, plus stripped if it ends in whitespace."""
    variants = []
    for prompt in prompts:
        variants.append((prompt, "as given"))
        if prompt != prompt.rstrip():
            variants.append((prompt.rstrip(), "trailing whitespace stripped"))
    return variants


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model directory or hub id "
                        "(default: base_model_name_or_path of --adapter)")
    parser.add_argument("--adapter", type=Path, help="LoRA adapter directory (axolotl output_dir)")
    parser.add_argument("--prompt", action="append",
                        help="prompt, repeatable (default: a built-in list incl. the notebook's)")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    parser.add_argument("--samples", type=int, default=1, help="sampled generations per prompt")
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN_DATA,
                        help=f"training text for the memorisation check (default "
                        f"{DEFAULT_TRAIN_DATA})")
    parser.add_argument("--no-memorisation", action="store_true",
                        help="skip the memorisation check (no --train needed)")
    parser.add_argument("--load-in-4bit", action="store_true", help="nf4 base weights (CUDA)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--eos-token", help="override the tokenizer's EOS (generation stops there)")
    parser.add_argument("--pad-token", help="override the pad token")
    parser.add_argument("--out", type=Path, help="output directory (default ADAPTER/eval or "
                        "outputs/eval)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature <= 0:
        raise EvalError(f"--temperature {args.temperature} must be > 0 (greedy is always run)")
    if not 0 < args.top_p <= 1:
        raise EvalError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.samples < 0:
        raise EvalError(f"--samples {args.samples} must be >= 0")
    for prompt in args.prompt or []:
        if not prompt.strip():
            raise EvalError("--prompt is empty: give some text to continue")


def generate_one(model, tok, prompt: str, args, seed: int | None) -> dict:
    import torch
    from transformers import GenerationConfig

    ids = encode(tok, [prompt])[0][0]
    input_ids = torch.tensor([ids], device=model_device(model))
    sampling = seed is not None
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if sampling else None,
        top_p=args.top_p if sampling else None,
        top_k=0 if sampling else None,  # off: None would be filled with the default 50
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    if sampling:
        torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config)
    seconds = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    return {
        "text": tok.decode(new, skip_special_tokens=True),
        "n_prompt_tokens": len(ids),
        "n_new_tokens": len(new),
        "stopped_at_eos": bool(new) and new[-1] == tok.eos_token_id,
        "seconds": round(seconds, 3),
    }


def render_markdown(result: dict) -> str:
    labels = result["models"]
    settings = result["settings"]
    lines = [
        "# Generations",
        "",
        f"- model: `{result['model']}`" + (f", adapter: `{result['adapter']}`"
                                            if result["adapter"] else ""),
        f"- greedy and {settings['samples']} sample(s) per prompt (temperature "
        f"{settings['temperature']}, top-p {settings['top_p']}, seeds from {settings['seed']}), "
        f"up to {settings['max_new_tokens']} new tokens; {result['device']}, {result['dtype']}",
    ]
    mem = result["memorisation"]
    if mem["train"]:
        lines.append(
            f"- copied = share of the generation's word {NGRAM}-grams found verbatim in "
            f"`{mem['train']}` ({mem['train_words']:,} words; lower-cased, punctuation "
            f"stripped); n/a = fewer than {NGRAM} words. Mean share: "
            + ", ".join(f"{m} {_pct(mem['mean_share'].get(m))}" for m in labels)
        )
    else:
        lines.append("- memorisation check skipped (--no-memorisation)")
    lines += render_generation_sections(result)
    lines.append("")
    return "\n".join(lines)


def render_generation_sections(result: dict, level: int = 2) -> list[str]:
    """Per prompt, a table with one row per decoding (greedy, samples), one column per model."""
    labels = result["models"]
    lines = []
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    for record in result["generations"]:
        by_prompt.setdefault((record["prompt"], record["prompt_variant"]), []).append(record)
    for (prompt, variant), records in by_prompt.items():
        lines += ["", f"{'#' * level} `{json.dumps(prompt, ensure_ascii=False)}` ({variant})",
                  "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        modes = list(dict.fromkeys((r["mode"], r["seed"]) for r in records))
        for mode, seed in modes:
            cells = []
            for label in labels:
                rec = next(r for r in records
                           if r["model"] == label and r["mode"] == mode and r["seed"] == seed)
                cell = md_escape(rec["text"].strip()) or "_(empty)_"
                if rec["memorisation"] is not None:
                    m = rec["memorisation"]
                    cell += (f"<br>_copied {_pct(m['share'])}"
                             + (f" ({m['n_copied']}/{m['n_ngrams']})" if m["n_ngrams"] else "")
                             + "_")
                cells.append(cell)
            name = "greedy" if mode == "greedy" else f"sample (seed {seed})"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f} %"


def run(args) -> dict:
    check_args(args)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    index = None
    if not args.no_memorisation:
        if not Path(args.train).is_file():
            raise EvalError(f"training text {args.train} not found (for the memorisation check): "
                            "run `python -m data_prep`, pass --train FILE or --no-memorisation")
        index = TrainingIndex(read_texts(args.train, what="training text"))
        LOG.info("memorisation index: %d words, %d distinct %d-grams from %s",
                 index.n_words, len(index.ngrams), NGRAM, args.train)
    model_ref, _ = resolve_model_arg(args.model, args.adapter)
    out_dir = args.out or default_out_dir(args.adapter)

    quiet_library_logs()
    resolve_device(args.load_in_4bit)  # --load-in-4bit without CUDA fails before any loading
    tok = load_tokenizer(model_ref, args.tokenizer, args.eos_token, args.pad_token)
    model = load_model(model_ref, args.adapter, load_in_4bit=args.load_in_4bit)
    labels = ["base", "adapter"] if args.adapter else ["base"]
    seeds = [None] + [args.seed + i for i in range(args.samples)]

    from tqdm.auto import tqdm

    variants = prompt_variants(prompts)
    records = []
    bar = tqdm(total=len(variants) * len(seeds) * len(labels), desc="generating", unit="gen")
    for label in labels:
        # base = the same loaded weights with the adapter disabled
        with base_model_context(model) if label == "base" else contextlib.nullcontext():
            for prompt, variant in variants:
                for seed in seeds:
                    record = {"prompt": prompt, "prompt_variant": variant, "model": label,
                              "mode": "greedy" if seed is None else "sample", "seed": seed}
                    record.update(generate_one(model, tok, prompt, args, seed))
                    record["memorisation"] = index.share(record["text"]) if index else None
                    records.append(record)
                    bar.update()
    bar.close()

    order = {label: i for i, label in enumerate(labels)}
    records.sort(key=lambda r: (variants.index((r["prompt"], r["prompt_variant"])),
                                seeds.index(r["seed"]), order[r["model"]]))
    mean_share = {}
    for label in labels:
        shares = [r["memorisation"]["share"] for r in records if r["model"] == label
                  and r["memorisation"] and r["memorisation"]["share"] is not None]
        mean_share[label] = sum(shares) / len(shares) if shares else None
    param = next(model.parameters())
    result = {
        "schema_version": 1,
        "timestamp": utc_timestamp(),
        "model": model_ref,
        "adapter": str(args.adapter) if args.adapter else None,
        "models": labels,
        "device": str(model_device(model)),
        "dtype": "nf4 (bnb 4-bit)" if args.load_in_4bit else str(param.dtype).removeprefix(
            "torch."),
        "settings": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                     "top_p": args.top_p, "seed": args.seed, "samples": args.samples,
                     "eos_token": tok.eos_token},
        "memorisation": {
            "ngram": NGRAM,
            "train": str(args.train) if index else None,
            "train_sha256": sha256_of(args.train) if index else None,
            "train_words": index.n_words if index else None,
            "normalisation": "NFKC, lower case, curly quotes straightened, words = runs of "
                             "letters/digits with inner apostrophes; generated text only",
            "mean_share": mean_share,
        },
        "versions": library_versions(),
        "generations": records,
    }
    markdown = render_markdown(result)
    written = write_files_atomic(out_dir, {
        GENERATIONS_JSON: json.dumps(result, indent=2, ensure_ascii=False) + "\n",
        "generations.md": markdown,
    })
    print(markdown)
    for path in written:
        print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run_main(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
