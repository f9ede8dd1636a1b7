"""Generations of the base model and its LoRA adapter side by side, with a memorisation check.

Usage:
    python -m eval.generate --model models/tiny-mistral --adapter outputs/tiny-mistral-cpu \
        --train data/prepared/clean/train.jsonl
    python -m eval.generate [--model PATH_OR_HUB_ID] [--adapter DIR] [--prompt TEXT ...]
        [--max-new-tokens 60] [--temperature 0.8] [--top-p 0.95] [--seed 0] [--samples 1]
        [--batch-size N] [--train FILE | --no-memorisation] [--load-in-4bit] [--eos-token T]
        [--out DIR]

For every prompt, each model (base = adapter disabled, and base+adapter) writes one greedy
continuation and --samples sampled ones; sample i of every model uses seed --seed + i, so base
and adapter draw with the same seed. A prompt that ends in whitespace is also run with the
whitespace stripped: BPE tokenizers (SmolLM2's) turn a trailing space into its own odd token,
which derails some models; both variants are shown, the prompt exactly as given.

Batched: all generations of a model (greedy and sampled rows mixed) run as one left-padded batch
(--batch-size rows at most). Each sampled row draws its tokens with its own generator seeded
with its seed (temperature, then top-p, then one uniform draw per token), so a sample is the
same whatever the batch size or the other rows in the batch; greedy rows are plain argmax, the
same tokens as one prompt at a time. (On a GPU the logits of a row can differ in their last bits
between batch shapes, which can very rarely change a token.) The generated tokens per second
are printed and recorded.

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
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.files import sha256_of
from core.runs import DEFAULT_TRAIN_DATA, GENERATIONS_JSON, GENERATIONS_MD
from eval.common import (
    LoadedModel,
    ModelOptions,
    add_model_options,
    base_model_context,
    encode,
    library_versions,
    md_escape,
    model_device,
    model_line,
    read_texts,
    script_main,
    utc_timestamp,
    write_results,
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


@dataclass
class Options(ModelOptions):
    """What `python -m eval.generate` generates and how: its command-line options, typed (each
    field's flag is its name with dashes; the repeatable --prompt last). `python -m eval` builds
    one directly."""

    max_new_tokens: int = 60
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    samples: int = 1
    batch_size: int = 0
    train: Path | None = DEFAULT_TRAIN_DATA
    no_memorisation: bool = False
    prompt: list[str] | None = None


def parse_args(argv=None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, eos_help="override the tokenizer's EOS (generation stops there)",
                      pad_help="override the pad token")
    parser.add_argument("--prompt", action="append",
                        help="prompt, repeatable (default: a built-in list incl. the notebook's)")
    parser.add_argument("--max-new-tokens", type=int, default=Options.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=Options.temperature)
    parser.add_argument("--top-p", type=float, default=Options.top_p)
    parser.add_argument("--seed", type=int, default=Options.seed, help="seed of the first sample")
    parser.add_argument("--samples", type=int, default=Options.samples,
                        help="sampled generations per prompt")
    parser.add_argument("--batch-size", type=int, default=Options.batch_size,
                        help=f"rows per generate() call (default 0: all generations of a model "
                        f"at once, up to {MAX_BATCH})")
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN_DATA,
                        help=f"training text for the memorisation check (default "
                        f"{DEFAULT_TRAIN_DATA})")
    parser.add_argument("--no-memorisation", action="store_true",
                        help="skip the memorisation check (no --train needed)")
    return Options(**vars(parser.parse_args(argv)))


def check_args(args: Options) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature} must be > 0 (greedy is always run)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.samples < 0:
        raise UserError(f"--samples {args.samples} must be >= 0")
    if args.batch_size < 0:
        raise UserError(f"--batch-size {args.batch_size} must be >= 0 (0 = all rows at once)")
    for prompt in args.prompt or []:
        if not prompt.strip():
            raise UserError("--prompt is empty: give some text to continue")


MAX_BATCH = 64  # rows per generate() call when --batch-size is 0 (all rows of a model)


def sampler_class():
    """PerRowSampler, defined on first use so that importing this module stays light."""
    global PerRowSampler
    if PerRowSampler is not None:
        return PerRowSampler
    import torch
    from transformers import LogitsProcessor

    class _PerRowSampler(LogitsProcessor):
        """Greedy rows pass through; each sampled row draws its next token with its own seeded
        generator (temperature, then top-p, then one uniform draw per step: the token whose
        cumulative probability first reaches it) and gets logits that force that token, so
        argmax decoding emits it. A row's draws depend only on its seed and its own logits,
        not on the batch around it."""

        def __init__(self, seeds: list[int | None], temperature: float, top_p: float, device):
            self.rows = torch.tensor([i for i, s in enumerate(seeds) if s is not None],
                                     dtype=torch.long, device=device)
            self.generators = [torch.Generator().manual_seed(s) for s in seeds if s is not None]
            self.temperature = temperature
            self.top_p = top_p

        def __call__(self, input_ids, scores):
            if not self.generators:
                return scores
            logits = scores.index_select(0, self.rows)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            probs = torch.softmax(logits / self.temperature, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
            # top-p: keep the most likely tokens until their mass reaches top_p (at least one)
            keep = (sorted_probs.cumsum(-1) - sorted_probs) < self.top_p
            cdf = (sorted_probs * keep).cumsum(-1)
            draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64)
                                 for g in self.generators]).to(cdf.device, cdf.dtype)
            pick = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(1))
            tokens = order.gather(1, pick.clamp_max(cdf.shape[1] - 1))
            forced = torch.full_like(logits, float("-inf")).scatter_(1, tokens, 0.0)
            return scores.index_copy(0, self.rows, forced.to(scores.dtype))

    PerRowSampler = _PerRowSampler
    return PerRowSampler


PerRowSampler = None


def generate_batch(model, tok, prompts: list[str], seeds: list[int | None], args,
                   streamer=None) -> list[dict]:
    """Continuations of `prompts` in one left-padded generate() call; seed None = greedy.
    `streamer` (transformers' streamer interface, one prompt only) receives each new token as it
    is generated (the side-by-side page streams it)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    ids = [encode(tok, [prompt])[0][0] for prompt in prompts]
    width = max(len(row) for row in ids)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    device = model_device(model)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
    attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids],
                             device=device)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad)
    processors = LogitsProcessorList()
    if any(seed is not None for seed in seeds):
        processors.append(sampler_class()(seeds, args.temperature, args.top_p, device))
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention,
                                 generation_config=config, logits_processor=processors,
                                 streamer=streamer)
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory while generating a batch of {len(prompts)} rows: "
                        "lower --batch-size (e.g. --batch-size 4)") from None
    results = []
    for row, prompt_ids in zip(out[:, width:].tolist(), ids, strict=True):
        new = row[: row.index(eos) + 1] if eos in row else row  # what follows EOS is padding
        results.append({
            "text": tok.decode(new, skip_special_tokens=True),
            "n_prompt_tokens": len(prompt_ids),
            "n_new_tokens": len(new),
            "stopped_at_eos": bool(new) and new[-1] == eos,
        })
    return results


def generate_rows(model, tok, rows: list[dict], args, batch_size: int = 0) -> dict:
    """Fill in the continuation of every row ({"prompt", "seed"}) of one model, `batch_size`
    rows per generate() call (0 = all, up to MAX_BATCH); returns timing figures."""
    import torch

    size = batch_size or min(len(rows), MAX_BATCH)
    # similar prompt lengths together: less padding when the rows do not fit one batch
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
    seconds, batches = 0.0, 0
    for first in range(0, len(order), size):
        chunk = [rows[i] for i in order[first : first + size]]
        cuda = model_device(model).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = generate_batch(model, tok, [r["prompt"] for r in chunk],
                                 [r["seed"] for r in chunk], args)
        if cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        for row, output in zip(chunk, outputs, strict=True):
            row.update(output)
            row["batch"] = batches
        batches += 1
    new_tokens = sum(r["n_new_tokens"] for r in rows)
    return {"seconds": seconds, "new_tokens": new_tokens, "batches": batches,
            "batch_size": size}


def render_markdown(result: dict) -> str:
    labels = result["models"]
    settings = result["settings"]
    lines = [
        "# Generations",
        "",
        model_line(result),
        f"- greedy and {settings['samples']} sample(s) per prompt (temperature "
        f"{settings['temperature']}, top-p {settings['top_p']}, seeds from {settings['seed']}), "
        f"up to {settings['max_new_tokens']} new tokens; {result['device']}, {result['dtype']}",
    ]
    timing = result.get("timing")
    if timing:
        lines.append(f"- {timing['new_tokens']:,} new tokens in {timing['seconds']:.2f} s "
                     f"({timing['tokens_per_s'] or 0:,.0f} tokens/s, {timing['batches']} "
                     "batched generate() call(s); model loading not included)")
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


def mean_shares(records: list[dict], labels: list[str]) -> dict:
    """Each model's mean copied share over its generations that have one."""
    mean_share = {}
    for label in labels:
        shares = [r["memorisation"]["share"] for r in records if r["model"] == label
                  and r["memorisation"] and r["memorisation"]["share"] is not None]
        mean_share[label] = sum(shares) / len(shares) if shares else None
    return mean_share


def run(args: Options, loaded: LoadedModel | None = None) -> dict:
    """Generate, check memorisation, write OUT/generations.*; `loaded` reuses a loaded model."""
    check_args(args)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    index = None
    if not args.no_memorisation:
        if not Path(args.train).is_file():
            raise UserError(f"training text {args.train} not found (for the memorisation check): "
                            "run `python -m data_prep`, pass --train FILE or --no-memorisation")
        index = TrainingIndex(read_texts(args.train, what="training text"))
        LOG.info("memorisation index: %d words, %d distinct %d-grams from %s",
                 index.n_words, len(index.ngrams), NGRAM, args.train)
    model_ref, out_dir, loaded = args.load(loaded)
    tok, model = loaded.tok, loaded.model
    labels = ["base", "adapter"] if args.adapter else ["base"]
    seeds = [None] + [args.seed + i for i in range(args.samples)]

    variants = prompt_variants(prompts)
    records, seconds, batches = [], 0.0, 0
    for label in labels:
        rows = [{"prompt": prompt, "prompt_variant": variant, "model": label,
                 "mode": "greedy" if seed is None else "sample", "seed": seed}
                for prompt, variant in variants for seed in seeds]
        # base = the same loaded weights with the adapter disabled
        with base_model_context(model) if label == "base" else contextlib.nullcontext():
            timing = generate_rows(model, tok, rows, args, args.batch_size)
        LOG.info("%s: %d generations, %d new tokens in %.2f s (%d batch(es) of up to %d rows)",
                 label, len(rows), timing["new_tokens"], timing["seconds"], timing["batches"],
                 timing["batch_size"])
        for row in rows:
            row["batch"] += batches
            row["memorisation"] = index.share(row["text"]) if index else None
        seconds += timing["seconds"]
        batches += timing["batches"]
        records += rows
    new_tokens = sum(r["n_new_tokens"] for r in records)
    timing = {"seconds": round(seconds, 3), "new_tokens": new_tokens, "batches": batches,
              "tokens_per_s": round(new_tokens / seconds, 1) if seconds else None,
              "load_seconds": round(loaded.seconds, 2)}
    print(f"generated {len(records)} continuations, {new_tokens:,} new tokens in {seconds:.2f} s: "
          f"{timing['tokens_per_s'] or 0:,.0f} tokens/s ({batches} batch(es))")

    order = {label: i for i, label in enumerate(labels)}
    records.sort(key=lambda r: (variants.index((r["prompt"], r["prompt_variant"])),
                                seeds.index(r["seed"]), order[r["model"]]))
    mean_share = mean_shares(records, labels)
    result = {
        "schema_version": 2,
        "timestamp": utc_timestamp(),
        "model": model_ref,
        "adapter": str(args.adapter) if args.adapter else None,
        "models": labels,
        "device": str(model_device(model)),
        "dtype": loaded.dtype_name,
        "settings": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                     "top_p": args.top_p, "seed": args.seed, "samples": args.samples,
                     "eos_token": tok.eos_token, "batch_size": args.batch_size or None},
        "timing": timing,
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
    write_results(out_dir, GENERATIONS_JSON, result, GENERATIONS_MD, render_markdown(result))
    return result


main = script_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
