"""Perplexity of a base model and its LoRA adapter on held-out text (and a control text).

Usage:
    python -m eval.perplexity --model models/tiny-mistral --adapter outputs/tiny-mistral-cpu \
        --compare --data data/prepared/clean/eval.jsonl --control eval/control_passage.txt
    python -m eval.perplexity --model PATH_OR_HUB_ID [--adapter DIR [--compare]]
        [--data FILE ...] [--control FILE ...] [--window 1024] [--stride 512]
        [--batch-size 8] [--load-in-4bit] [--eos-token T] [--pad-token T] [--out DIR]

`--adapter` alone scores base+adapter; `--compare` also scores the base model (the same loaded
weights with the adapter disabled) on the same tokens. `--model` defaults to the adapter's
base_model_name_or_path. Datasets: `--data` (held-out, repeatable, default
data/prepared/clean/eval.jsonl) and `--control` (repeatable): JSONL with one {"text": ...} per
line, or plain text split into rows at blank lines. Each dataset is reported separately.

Metrics, per model and dataset (NLL in nats; a "row" is one JSONL line or paragraph):
  notebook   mean over rows of exp(mean NLL of the row's predicted tokens): the original
             notebook's number. Short rows weigh as much as long ones and exp() of a mean is
             not a mean of exps, so it is not a perplexity of the corpus; kept for comparison.
  corpus     exp(total NLL / total predicted tokens) over all rows (token-weighted).
  sliding    rows joined with blank lines into one text, tokenised once, scored with
             windows of --window tokens moved by --stride: each token scored once, with up to
             window-1 tokens of context (see eval/scoring.py).
  bpb        bits per byte  = total NLL / (ln 2 * UTF-8 bytes of the scored text)
  word ppl   word perplexity = exp(total NLL / words), words = whitespace-separated pieces
  bpb and word perplexity do not depend on the tokenizer, so they compare models with different
  vocabularies (Mistral vs SmolLM2); token perplexities do not.
Predicted tokens exclude padding and the first token of each text: BOS when the tokenizer adds
one (Mistral), else a context-only EOS prefix (SmolLM2; see core/tokens.py), so
every byte of the text belongs to a scored token. Rows longer than --window tokens are scored
with the same sliding windows. The change base -> adapter is reported in percent.

Outputs (written only after everything is scored, atomically): OUT/perplexity.json and
OUT/perplexity.md, OUT = --out, else ADAPTER/eval/, else outputs/eval/.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.files import sha256_of
from core.runs import DEFAULT_EVAL_DATA, PERPLEXITY_JSON, PERPLEXITY_MD
from core.tokens import context_prefix_id
from eval.common import (
    LoadedModel,
    ModelOptions,
    add_model_options,
    base_model_context,
    encode,
    fmt,
    library_versions,
    merged_adapter_context,
    model_device,
    model_line,
    read_texts,
    script_main,
    utc_timestamp,
    write_results,
)
from eval.scoring import Window, score_windows, windows_of

LOG = logging.getLogger("eval.perplexity")

STREAM_JOINER = "\n\n"
# Metrics compared base -> adapter (lower is better for all of them).
COMPARED = (
    "notebook_mean_row_ppl",
    "corpus_ppl",
    "corpus_bits_per_byte",
    "corpus_word_ppl",
    "sliding_ppl",
    "sliding_bits_per_byte",
    "sliding_word_ppl",
)
NOTE = (
    "Lower is better everywhere. The notebook metric is the original notebook's number (mean "
    "over rows of exp(mean row loss)), not a corpus perplexity. Bits per byte and word "
    "perplexity compare across tokenizers."
)
LABELS = {
    "notebook_mean_row_ppl": "notebook metric: mean over rows of exp(row loss)",
    "corpus_ppl": "corpus perplexity (token-weighted)",
    "corpus_bits_per_byte": "bits per byte (corpus)",
    "corpus_word_ppl": "word perplexity (corpus)",
    "sliding_ppl": "sliding-window perplexity",
    "sliding_bits_per_byte": "bits per byte (sliding)",
    "sliding_word_ppl": "word perplexity (sliding)",
}


@dataclass
class Dataset:
    name: str
    kind: str  # "held-out" or "control"
    path: Path
    rows: list[str]
    sha256: str
    row_ids: list[list[int]] = field(default_factory=list)
    stream_ids: list[int] = field(default_factory=list)

    @property
    def stream_text(self) -> str:
        return STREAM_JOINER.join(self.rows)


@dataclass
class Options(ModelOptions):
    """What `python -m eval.perplexity` scores and how: its command-line options, typed (each
    field's flag is its name with dashes). `python -m eval` builds one directly."""

    compare: bool = False
    data: list[Path] | None = None
    control: list[Path] = field(default_factory=list)
    window: int = 1024
    stride: int = 512
    batch_size: int = 8
    max_rows: int | None = None
    padding_side: str = "right"
    no_progress: bool = False


def parse_args(argv=None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -m pydoc eval.perplexity) for the metrics.",
    )
    add_model_options(parser, eos_help="override the tokenizer's EOS token",
                      pad_help="override the pad token (batching only, never scored)")
    parser.add_argument("--compare", action="store_true",
                        help="score the base model too (adapter disabled), same tokens")
    parser.add_argument("--data", type=Path, action="append",
                        help=f"held-out dataset, repeatable (default {DEFAULT_EVAL_DATA})")
    parser.add_argument("--control", type=Path, action="append", default=[],
                        help="control dataset (JSONL or plain text), repeatable")
    parser.add_argument("--window", type=int, default=Options.window,
                        help="tokens per scoring window")
    parser.add_argument("--stride", type=int, default=Options.stride,
                        help="tokens the window moves by")
    parser.add_argument("--batch-size", type=int, default=Options.batch_size,
                        help="windows per forward pass")
    parser.add_argument("--max-rows", type=int, help="use only the first N rows of each dataset")
    parser.add_argument("--padding-side", choices=("right", "left"), default=Options.padding_side)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return Options(**vars(parser.parse_args(argv)))


def check_args(args: Options) -> None:
    if args.compare and args.adapter is None:
        raise UserError("--compare needs --adapter DIR (it compares the base with base+adapter)")
    if args.window < 2:
        raise UserError(f"--window {args.window} is too small: use at least 2 tokens")
    if not 1 <= args.stride <= args.window:
        raise UserError(f"--stride {args.stride} must be between 1 and --window {args.window}: "
                        "a larger stride would skip tokens")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    if args.max_rows is not None and args.max_rows < 1:
        raise UserError(f"--max-rows {args.max_rows} must be >= 1")


def read_datasets(data: list[Path], control: list[Path], max_rows: int | None) -> list[Dataset]:
    datasets, names = [], set()
    for kind, paths in (("held-out", data), ("control", control)):
        for path in paths:
            rows = read_texts(path, what=f"{kind} data file")
            if max_rows:
                rows = rows[:max_rows]
            name = path.stem
            while name in names:
                name = f"{path.parent.name}/{name}" if "/" not in name else name + "'"
            names.add(name)
            datasets.append(Dataset(name, kind, path, rows, sha256_of(path)))
    return datasets


def count_words(text: str) -> int:
    return len(text.split())


def safe_exp(x: float) -> float:
    """exp() that gives inf instead of raising (an untrained model's word perplexity)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def finite_or_none(value):
    """JSON has no inf/nan: write them as null (rendered "n/a")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def row_metrics(row_nll: list[list[float]], n_bytes: int, n_words: int) -> dict:
    """Notebook and corpus metrics from per-row token NLLs."""
    scored = [r for r in row_nll if r]
    total = sum(sum(r) for r in scored)
    n_tokens = sum(len(r) for r in scored)
    return {
        "notebook_mean_row_ppl": sum(safe_exp(sum(r) / len(r)) for r in scored) / len(scored),
        "corpus_nll_nats": total,
        "corpus_ppl": safe_exp(total / n_tokens),
        "corpus_bits_per_byte": total / (math.log(2) * n_bytes),
        "corpus_word_ppl": safe_exp(total / n_words),
    }


def stream_metrics(nll: list[float], n_bytes: int, n_words: int) -> dict:
    total = sum(nll)
    return {
        "sliding_nll_nats": total,
        "sliding_ppl": safe_exp(total / len(nll)),
        "sliding_bits_per_byte": total / (math.log(2) * n_bytes),
        "sliding_word_ppl": safe_exp(total / n_words),
    }


def relative_change(before: dict, after: dict) -> dict:
    """Percent change before -> after of each compared metric (negative = lower = better)."""
    change = {}
    for key in COMPARED:
        a, b = before.get(key), after.get(key)
        finite = all(isinstance(v, float) and math.isfinite(v) for v in (a, b))
        change[key] = 100.0 * (b - a) / a if finite and a else None
    return change


def score_rows(model, row_ids: list[list[int]], *, window: int, stride: int, batch_size: int = 8,
               pad_id: int = 0, padding_side: str = "right", desc: str = "rows",
               progress: bool = False):
    """Per-row token NLLs (rows longer than `window` are scored in sliding windows)."""
    windows: list[Window] = []
    owner: list[int] = []
    for index, ids in enumerate(row_ids):
        for w in windows_of(ids, window, stride):
            windows.append(w)
            owner.append(index)
    nll, stats = score_windows(model, windows, batch_size=batch_size, pad_id=pad_id,
                               padding_side=padding_side, desc=desc, progress=progress)
    per_row: list[list[float]] = [[] for _ in row_ids]
    for index, values in zip(owner, nll, strict=True):
        per_row[index].extend(values)
    return per_row, stats


def score_stream(model, ids: list[int], *, window: int, stride: int, batch_size: int = 8,
                 pad_id: int = 0, padding_side: str = "right", desc: str = "sliding",
                 progress: bool = False):
    """Token NLLs of one long token stream, each token after the first scored once."""
    nll, stats = score_windows(model, windows_of(ids, window, stride), batch_size=batch_size,
                               pad_id=pad_id, padding_side=padding_side, desc=desc,
                               progress=progress)
    return [x for values in nll for x in values], stats


def score_model(model, datasets: list[Dataset], args: Options, label: str, pad_id: int):
    """Metrics of one model on every dataset, plus throughput."""
    per_dataset, seconds, input_tokens = {}, 0.0, 0
    common = {"window": args.window, "stride": args.stride, "batch_size": args.batch_size,
              "pad_id": pad_id, "padding_side": args.padding_side,
              "progress": not args.no_progress}
    for ds in datasets:
        row_nll, row_stats = score_rows(model, ds.row_ids, desc=f"{label} {ds.name} rows",
                                        **common)
        stream_nll, stream_stats = score_stream(model, ds.stream_ids,
                                                desc=f"{label} {ds.name} sliding", **common)
        text = ds.stream_text
        metrics = row_metrics(row_nll, sum(len(r.encode("utf-8")) for r in ds.rows),
                              sum(count_words(r) for r in ds.rows))
        metrics.update(stream_metrics(stream_nll, len(text.encode("utf-8")), count_words(text)))
        ds_input = row_stats.input_tokens + stream_stats.input_tokens
        ds_seconds = row_stats.seconds + stream_stats.seconds
        metrics["tokens_per_s"] = ds_input / ds_seconds if ds_seconds else None
        per_dataset[ds.name] = metrics
        seconds += ds_seconds
        input_tokens += ds_input
        LOG.info("%s on %s: corpus ppl %.3f, sliding ppl %.3f, %.4f bpb, %s tokens/s",
                 label, ds.name, metrics["corpus_ppl"], metrics["sliding_ppl"],
                 metrics["corpus_bits_per_byte"], fmt(metrics["tokens_per_s"], 0))
    throughput = {"input_tokens": input_tokens, "seconds": seconds,
                  "tokens_per_s": input_tokens / seconds if seconds else None}
    return per_dataset, throughput


def dataset_summary(ds: Dataset, args: Options) -> dict:
    n_rows_scored = sum(1 for ids in ds.row_ids if len(ids) > 1)
    return {
        "name": ds.name,
        "kind": ds.kind,
        "path": str(ds.path),
        "sha256": ds.sha256,
        "n_rows": len(ds.rows),
        "n_rows_scored": n_rows_scored,
        "n_bytes": sum(len(r.encode("utf-8")) for r in ds.rows),
        "n_words": sum(count_words(r) for r in ds.rows),
        "n_tokens": sum(len(ids) for ids in ds.row_ids),
        "n_predicted_tokens": sum(
            len(w.ids) - w.first_target
            for ids in ds.row_ids for w in windows_of(ids, args.window, args.stride)
        ),
        "n_rows_longer_than_window": sum(1 for ids in ds.row_ids if len(ids) > args.window),
        "sliding": {
            "n_tokens": len(ds.stream_ids),
            "n_predicted_tokens": sum(
                len(w.ids) - w.first_target
                for w in windows_of(ds.stream_ids, args.window, args.stride)
            ),
            "n_windows": len(windows_of(ds.stream_ids, args.window, args.stride)),
            "n_bytes": len(ds.stream_text.encode("utf-8")),
            "n_words": count_words(ds.stream_text),
            "joiner": STREAM_JOINER,
        },
    }


def render_dataset_sections(result: dict, level: int = 2) -> list[str]:
    """One Markdown table per dataset: each metric per model and the change in percent."""
    labels = result["models"]
    lines = []
    for ds in result["datasets"]:
        header = ["metric", *labels] + (["change"] if len(labels) == 2 else [])
        lines += [
            "",
            f"{'#' * level} {ds['name']} ({ds['kind']}: `{ds['path']}`)",
            "",
            f"{ds['n_rows']} rows, {ds['n_predicted_tokens']:,} predicted tokens, "
            f"{ds['n_bytes']:,} bytes, {ds['n_words']:,} words; sliding: "
            f"{ds['sliding']['n_predicted_tokens']:,} predicted tokens in "
            f"{ds['sliding']['n_windows']} windows of {result['window']} (stride "
            f"{result['stride']}).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for key in COMPARED:
            cells = [LABELS[key]] + [fmt(ds["metrics"][m][key]) for m in labels]
            if len(labels) == 2:
                change = ds["relative_change_pct"][key]
                cells.append("n/a" if change is None else f"{change:+.2f} %")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: dict) -> str:
    labels = result["models"]
    lines = [
        "# Perplexity",
        "",
        model_line(result),
        f"- device {result['device']}, dtype {result['dtype']}, window {result['window']}, "
        f"stride {result['stride']}, batch {result['batch_size']}, {result['timestamp']}",
        f"- context before each text: {result['tokenizer']['context_prefix']}",
        "",
        NOTE,
        *render_dataset_sections(result),
        "",
        "Throughput (input tokens incl. window context, per second): "
        + ", ".join(f"{m} {fmt(result['throughput'][m]['tokens_per_s'], 0)}" for m in labels),
        "",
    ]
    return "\n".join(lines)


def run(args: Options, loaded: LoadedModel | None = None) -> dict:
    """Score, write OUT/perplexity.*; `loaded` reuses an already loaded tokenizer + model."""
    check_args(args)
    datasets = read_datasets(args.data or [DEFAULT_EVAL_DATA], args.control, args.max_rows)
    model_ref, out_dir, loaded = args.load(loaded)
    tok, model = loaded.tok, loaded.model
    prefix = context_prefix_id(tok)
    for ds in datasets:
        ds.row_ids = encode(tok, ds.rows)[0]
        ds.stream_ids = encode(tok, [ds.stream_text])[0][0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    passes = []
    if args.adapter is None:
        passes.append(("base", None))
    else:
        if args.compare:
            passes.append(("base", base_model_context))
        passes.append(("adapter", merged_adapter_context))
    metrics, throughput = {}, {}
    import torch

    for label, context in passes:
        try:
            with context(model) if context else contextlib.nullcontext():
                metrics[label], throughput[label] = score_model(
                    model, datasets, args, label, pad_id)
        except torch.OutOfMemoryError:
            raise UserError(f"out of GPU memory while scoring {args.batch_size} windows of up to "
                            f"{args.window} tokens at once: lower --batch-size (e.g. "
                            f"--batch-size {max(1, args.batch_size // 4)})") from None

    labels = [label for label, _ in passes]
    result = {
        "schema_version": 1,
        "timestamp": utc_timestamp(),
        "model": model_ref,
        "adapter": str(args.adapter) if args.adapter else None,
        "compare": bool(args.compare),
        "models": labels,
        "device": str(model_device(model)),
        "dtype": loaded.dtype_name,
        "window": args.window,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "padding_side": args.padding_side,
        "max_rows": args.max_rows,
        "tokenizer": {
            "source": args.tokenizer or model_ref,
            "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token,
            "context_prefix": (
                "BOS added by the tokenizer" if prefix is None
                else f"context-only {tok.convert_ids_to_tokens(prefix)!r} (tokenizer adds no BOS)"
            ),
        },
        "versions": library_versions(),
        "load_seconds": round(loaded.seconds, 2),
        "throughput": throughput,
        "datasets": [],
    }
    for ds in datasets:
        summary = dataset_summary(ds, args)
        summary["metrics"] = {label: metrics[label][ds.name] for label in labels}
        if len(labels) == 2:
            summary["relative_change_pct"] = relative_change(
                summary["metrics"]["base"], summary["metrics"]["adapter"])
        result["datasets"].append(summary)

    write_results(out_dir, PERPLEXITY_JSON, finite_or_none(result), PERPLEXITY_MD,
                  render_markdown(result), allow_nan=False)
    return result


main = script_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
