"""Turn the Frankenstein CSV into Axolotl completion JSONL with a seeded held-out split.

Usage:
    python -m data_prep                      # clean mode -> data/prepared/clean/
    python -m data_prep --mode seed          # notebook reproduction -> data/prepared/seed/
    python -m data_prep --mode both --csv path/to/frankenstein_chunks.csv

Finding the CSV: `--csv PATH`; else data/raw/frankenstein_chunks.csv; else it is downloaded
from the original repository into data/raw/. The sha256 is always checked (`--skip-checksum` for
another CSV with the same layout).

Reading it: pandas (every field a string, nothing turned into NaN; only the `text` column is
parsed, so extra fields are ignored as csv.DictReader ignores them), after the text is decoded
as UTF-8 and normalised: a byte-order mark is dropped and Windows (CRLF) or old Mac (CR) line
endings become LF, inside fields too, so the same book saved by another editor gives
byte-identical outputs in both modes (its checksum is checked on the normalised text too).
Nothing is dropped or changed without a word: a control character that is not whitespace (NUL,
BEL, VT, ESC, DEL, C1 controls; pandas' C parser cut a field at a NUL) is refused naming its
line and column, and every row pandas reads is checked against an independent parse of the
same text by Python's csv module: the same rows, each with the same text, or one error line
naming the row's line. Errors name the file and, for a bad row, the line it ends on; they all
come before anything is written. tests/test_data_prep_properties.py checks this over generated
CSVs.

Modes:
- clean (default): the 481 rows are consecutive slices of the Project Gutenberg text. They are
  rejoined, everything outside the `*** START OF` / `*** END OF` markers is dropped along with the
  title page and contents list, hard-wrapped lines are unwrapped (paragraph breaks kept, `_italic_`
  markup removed), and each letter/chapter is re-chunked on paragraph, then sentence, boundaries
  into passages of at most --max-tokens Mistral tokens. Whole sections (letters/chapters), drawn
  with --seed, are held out until they hold >= --eval-fraction of the tokens, so no eval passage
  neighbours a training passage mid-scene.
- seed: the 481 original rows unchanged, split 80/20 at random with --seed, as the original
  notebook did (unseeded there), to reproduce its numbers.

Outputs (written to a temporary directory, then renamed into place; core/files.py):
    data/prepared/<mode>/train.jsonl, eval.jsonl   one {"text": ...} per line
    data/prepared/<mode>/stats.json                counts, token statistics, sha256 of inputs/outputs
Same input + same settings -> byte-identical outputs; a second run with nothing changed is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError, cli
from core.files import os_reason, sha256_of, staged_dir
from data_prep.csv_input import (
    CSV_NAME,
    DEFAULT_MAX_ROW_CHARS,
    input_sha256,
    locate_csv,
    read_rows,
    verify_checksum,
)

LOG = logging.getLogger("data_prep")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "prepared"

DEFAULT_SEED = 42
# 512 Mistral tokens keeps every passage inside each recipe's sequence_len, including the
# SmolLM2 demo, whose tokenizer needs up to ~10% more tokens for the same text.
DEFAULT_MAX_TOKENS = 512
DEFAULT_EVAL_FRACTION = 0.10
SEED_MODE_EVAL_FRACTION = 0.20
PREP_VERSION = 1  # bump when the cleaning/chunking logic changes the output

START_MARKER = re.compile(r"^[ \t]*\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M)
END_MARKER = re.compile(r"^[ \t]*\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M)
# Real section headings start at column 0; the contents list indents them by one space.
SECTION_HEADING = re.compile(r"^(Letter|Chapter) (\d+)[ \t]*$", re.M)
SENTENCE_BREAK = re.compile(r"[.!?;:][\"'”’)]*(\s+)")


@dataclass(frozen=True)
class Section:
    title: str
    paragraphs: list[str]


# --------------------------------------------------------------------------------------------
# Clean mode: rejoin, strip boilerplate, unwrap, re-chunk, hold out whole sections


def extract_book(text: str, source: Path) -> str:
    """The text between the Project Gutenberg START and END markers."""
    start = START_MARKER.search(text)
    end = END_MARKER.search(text)
    if start is None or end is None or end.start() <= start.end():
        missing = "START" if start is None else "END" if end is None else "END before START"
        raise UserError(
            f"{source}: Project Gutenberg marker not found ({missing}: '*** START OF ... ***' / "
            "'*** END OF ... ***'); clean mode needs the full eBook text, use --mode seed otherwise"
        )
    return text[start.end() : end.start()]


def normalise_paragraph(paragraph: str) -> str:
    paragraph = re.sub(r"_([^_]+)_", r"\1", paragraph)  # Gutenberg's _italic_ markup
    return re.sub(r"\s+", " ", paragraph).strip()


def split_sections(book: str, source: Path) -> list[Section]:
    """Letters and chapters, each with its unwrapped paragraphs; front matter dropped."""
    headings = list(SECTION_HEADING.finditer(book))
    if not headings:
        raise UserError(
            f"{source}: no 'Letter N' / 'Chapter N' headings found between the Gutenberg markers"
        )
    sections = []
    for i, heading in enumerate(headings):
        body_end = headings[i + 1].start() if i + 1 < len(headings) else len(book)
        body = book[heading.end() : body_end]
        paragraphs = [normalise_paragraph(p) for p in re.split(r"\n[ \t]*\n", body)]
        paragraphs = [p for p in paragraphs if p]
        title = f"{heading.group(1)} {heading.group(2)}"
        sections.append(Section(title=title, paragraphs=[title, *paragraphs]))
    return sections


def split_sentences(text: str) -> list[str]:
    """Split after sentence punctuation (and any closing quotes), at the following whitespace."""
    pieces, start = [], 0
    for match in SENTENCE_BREAK.finditer(text):
        pieces.append(text[start : match.start(1)])
        start = match.end(1)
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _pieces_within(text: str, max_tokens: int, count) -> list[str]:
    """Split one over-long paragraph into sentences, and over-long sentences into word runs."""
    if count(text) <= max_tokens:
        return [text]
    sentences = split_sentences(text)
    if len(sentences) > 1:
        return [piece for s in sentences for piece in _pieces_within(s, max_tokens, count)]
    pieces, current = [], []
    for word in text.split(" "):
        if current and count(" ".join([*current, word])) > max_tokens:
            pieces.append(" ".join(current))
            current = []
        current.append(word)
    pieces.append(" ".join(current))
    return pieces


def chunk_section(section: Section, max_tokens: int, count) -> list[str]:
    """Greedy passages of whole paragraphs (sentences for long ones), each <= max_tokens."""
    passages: list[str] = []
    current = ""
    for paragraph in section.paragraphs:
        for i, piece in enumerate(_pieces_within(paragraph, max_tokens, count)):
            # pieces of one split paragraph are rejoined with a space, paragraphs with a break
            candidate = current + (" " if i else "\n\n") + piece if current else piece
            if current and count(candidate) > max_tokens:
                passages.append(current)
                current = piece
            else:
                current = candidate
    if current:
        passages.append(current)
    return passages


def choose_eval_sections(token_counts: list[int], fraction: float, seed: int) -> set[int]:
    """Indices of whole sections, drawn in seeded order until >= fraction of all tokens."""
    order = list(range(len(token_counts)))
    random.Random(seed).shuffle(order)
    total, chosen, held = sum(token_counts), set(), 0
    for index in order:
        if held >= fraction * total:
            break
        chosen.add(index)
        held += token_counts[index]
    if len(chosen) == len(token_counts):
        raise UserError(f"--eval-fraction {fraction} leaves no training sections; lower it")
    return chosen


def prepare_clean(
    rows: list[str], source: Path, max_tokens: int, eval_fraction: float, seed: int
) -> tuple[list[str], list[str], dict]:
    from data_prep.tokenizer import load_mistral_tokenizer

    tokenizer = load_mistral_tokenizer()

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    book = extract_book("".join(rows), source)
    sections = split_sections(book, source)
    passages_by_section = [chunk_section(s, max_tokens, count) for s in sections]
    section_tokens = [sum(count(p) for p in passages) for passages in passages_by_section]
    held_out = choose_eval_sections(section_tokens, eval_fraction, seed)
    train, evaluation = [], []
    for index, passages in enumerate(passages_by_section):
        (evaluation if index in held_out else train).extend(passages)
    extra = {
        "sections": len(sections),
        "eval_sections": [sections[i].title for i in sorted(held_out)],
        "max_tokens": max_tokens,
        "eval_fraction_target": eval_fraction,
    }
    return train, evaluation, extra


def prepare_seed(rows: list[str], seed: int) -> tuple[list[str], list[str], dict]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(SEED_MODE_EVAL_FRACTION * len(rows))
    eval_rows = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in eval_rows]
    evaluation = [r for i, r in enumerate(rows) if i in eval_rows]
    return train, evaluation, {"eval_fraction_target": SEED_MODE_EVAL_FRACTION}


# --------------------------------------------------------------------------------------------
# Writing outputs


def split_stats(texts: list[str]) -> dict:
    from data_prep.tokenizer import count_tokens

    tokens = count_tokens(texts) if texts else []
    return {
        "rows": len(texts),
        "chars": sum(len(t) for t in texts),
        "tokens": sum(tokens),
        "tokens_per_row": {
            "min": min(tokens, default=0),
            "mean": round(statistics.fmean(tokens), 1) if tokens else 0,
            "max": max(tokens, default=0),
        },
    }


# Characters that json.dumps(ensure_ascii=False) leaves as they are but str.splitlines() breaks a
# line at (core.files reads JSONL that way): written as JSON escapes, which decode to the same text.
LINE_BREAKS_KEPT_BY_JSON = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def jsonl_line(text: str) -> str:
    line = json.dumps({"text": text}, ensure_ascii=False)
    for char, escape in LINE_BREAKS_KEPT_BY_JSON.items():
        line = line.replace(char, escape)
    return line + "\n"


def jsonl_bytes(texts: list[str]) -> bytes:
    """One {"text": ...} per line, UTF-8; a line never holds a character that any JSONL reader
    (or str.splitlines) takes for a line break."""
    return "".join(jsonl_line(t) for t in texts).encode()


def write_outputs(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write all files into a fresh temporary directory, then swap it into place."""
    with staged_dir(out_dir) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)


def settings_key(mode: str, input_sha: str, args: argparse.Namespace) -> dict:
    key = {"version": PREP_VERSION, "mode": mode, "input_sha256": input_sha, "seed": args.seed}
    if mode == "clean":
        key |= {"max_tokens": args.max_tokens, "eval_fraction": args.eval_fraction}
    return key


def is_up_to_date(out_dir: Path, key: dict) -> dict | None:
    """The existing stats.json if outputs were made with the same settings and are intact."""
    try:
        stats = json.loads((out_dir / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    if stats.get("settings") != key:
        return None
    for name, digest in stats.get("outputs_sha256", {}).items():
        if not (out_dir / name).is_file() or sha256_of(out_dir / name) != digest:
            return None
    return stats


def prepare(mode: str, csv_path: Path, input_sha: str, rows: list[str], args) -> dict:
    out_dir = args.out / mode
    key = settings_key(mode, input_sha, args)
    existing = is_up_to_date(out_dir, key)
    if existing is not None:
        print(f"[{mode}] up to date: {out_dir}")
        return existing
    if mode == "clean":
        train, evaluation, extra = prepare_clean(
            rows, csv_path, args.max_tokens, args.eval_fraction, args.seed
        )
    else:
        train, evaluation, extra = prepare_seed(rows, args.seed)
    files = {"train.jsonl": jsonl_bytes(train), "eval.jsonl": jsonl_bytes(evaluation)}
    stats = {
        "mode": mode,
        "seed": args.seed,
        "settings": key,
        "input": {"file": csv_path.name, "rows": len(rows), "sha256": input_sha},
        "tokenizer": "Mistral-7B-v0.1 (mistral_common tokenizer.model.v1); counts exclude BOS/EOS",
        "train": split_stats(train),
        "eval": split_stats(evaluation),
        **extra,
        "outputs_sha256": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
    }
    total_tokens = stats["train"]["tokens"] + stats["eval"]["tokens"]
    stats["eval_token_share"] = round(stats["eval"]["tokens"] / total_tokens, 4)
    files["stats.json"] = (json.dumps(stats, indent=2, ensure_ascii=False) + "\n").encode()
    try:
        write_outputs(out_dir, files)
    except OSError as exc:  # disk full, file-size limit, no permission, a file in the way
        raise UserError(
            f"{out_dir}: cannot write the outputs ({os_reason(exc)}); free disk space or fix "
            "the permissions (or pass another --out) and re-run; earlier outputs are unchanged"
        ) from exc
    print_summary(stats, out_dir)
    return stats


def print_summary(stats: dict, out_dir: Path) -> None:
    print(f"[{stats['mode']}] {stats['input']['rows']} CSV rows -> {out_dir}")
    for split in ("train", "eval"):
        s = stats[split]
        t = s["tokens_per_row"]
        print(
            f"  {split:5s} {s['rows']:4d} rows {s['chars']:8,d} chars {s['tokens']:7,d} tokens "
            f"(per row min {t['min']} / mean {t['mean']} / max {t['max']})"
        )
    print(f"  eval share of tokens: {stats['eval_token_share']:.1%}", end="")
    if "eval_sections" in stats:
        print(f"; held-out sections: {', '.join(stats['eval_sections'])}", end="")
    print()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Frankenstein CSV -> Axolotl completion JSONL with a seeded held-out split.",
    )
    parser.add_argument("--mode", choices=["clean", "seed", "both"], default="clean")
    parser.add_argument("--csv", type=Path, help=f"input CSV (default: find or fetch {CSV_NAME})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed")
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
        help="clean mode: max Mistral tokens per passage",
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
        help="clean mode: share of tokens held out, as whole letters/chapters",
    )
    parser.add_argument("--max-row-chars", type=int, default=DEFAULT_MAX_ROW_CHARS)
    parser.add_argument(
        "--skip-checksum", action="store_true",
        help="accept a CSV whose sha256 differs from the original's",
    )
    args = parser.parse_args(argv)
    if args.max_tokens < 16:
        parser.error("--max-tokens must be at least 16")
    if not 0.0 < args.eval_fraction < 1.0:
        parser.error("--eval-fraction must be between 0 and 1")
    return args


def run(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    csv_path = locate_csv(args.csv)
    input_sha = input_sha256(csv_path) if args.skip_checksum else verify_checksum(csv_path)
    rows = read_rows(csv_path, args.max_row_chars)
    modes = ["clean", "seed"] if args.mode == "both" else [args.mode]
    for mode in modes:
        prepare(mode, csv_path, input_sha, rows, args)


main = cli(run, prog="data_prep")
