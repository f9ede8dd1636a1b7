"""data_prep: every bad input gets one clear line and loses nothing; the real CSV is cleaned,
chunked and split as promised, deterministically."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, find_real_csv, real_csv_or_skip, write_synthetic_book

from data_prep.csv_input import read_rows
from data_prep.prepare import main
from data_prep.tokenizer import count_tokens

BOILERPLATE = ("Project Gutenberg", "PROJECT GUTENBERG", "*** START", "*** END", "CONTENTS",
               "www.gutenberg.org", "license", "License")


def write_csv(path: Path, rows: list[str], header: str = "text") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([header])
        writer.writerows([r] for r in rows)
    return path


def small_book(chapters: int = 6, paragraphs: int = 4) -> str:
    body = []
    for c in range(1, chapters + 1):
        body.append(f"Chapter {c}\n\n")
        for p in range(paragraphs):
            body.append(
                f"It was the {p}th evening of chapter {c}; I walked by the lake and\n"
                f"thought of the creature, of _Elizabeth_ and of home. The wind rose.\n\n"
            )
    return (
        "The Project Gutenberg eBook of a Test\n\nLicence words here.\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK A TEST ***\n\nA Test\n\n CONTENTS\n\n"
        " Chapter 1\n Chapter 2\n\n\n" + "".join(body) +
        "\n\n    *** END OF THE PROJECT GUTENBERG EBOOK A TEST ***\n\nSection 5. General license."
    )


def slices(text: str, width: int = 150) -> list[str]:
    return [text[i : i + width] for i in range(0, len(text), width)]


def run_prep(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(map(str, args)))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------------------------
# Bad inputs: one line naming the file, non-zero exit, earlier outputs untouched

BAD_INPUTS = {
    "missing file": (None, "file not found"),
    "missing text column": (lambda p: write_csv(p, ["a", "b"], header="body"), "no `text` column"),
    "empty csv": (lambda p: p.write_bytes(b""), "the file is empty"),
    "header only": (lambda p: p.write_text("text\n"), "has a header but no rows"),
    "non-utf8 bytes": (lambda p: p.write_bytes(b"text\n\"caf\xe9 au lait\"\n"), "not UTF-8"),
    "blank row": (lambda p: write_csv(p, ["fine", "   ", "fine"]), "empty `text`"),
    "one megabyte row": (lambda p: write_csv(p, ["x" * 1_048_576]), "over the 20,000 limit"),
    "markers not found": (lambda p: write_csv(p, ["Just some text.", "More text."]),
                          "Project Gutenberg marker not found"),
}


@pytest.fixture
def good_outputs(tmp_path, capsys) -> Path:
    """Outputs of a successful run that a later failing run must not touch."""
    csv_path = write_csv(tmp_path / "book.csv", slices(small_book()))
    out = tmp_path / "prepared"
    rc, _, err = run_prep(capsys, "--mode", "both", "--csv", csv_path, "--out", out,
                          "--skip-checksum", "--max-tokens", "64", "--eval-fraction", "0.3")
    assert rc == 0, err
    return out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_csv_gets_one_clear_line_and_loses_nothing(case, tmp_path, capsys, good_outputs):
    make, expected = BAD_INPUTS[case]
    bad = tmp_path / "bad.csv"
    if make is not None:
        make(bad)
    before = tree_digest(good_outputs)

    rc, _, err = run_prep(capsys, "--mode", "clean", "--csv", bad, "--out", good_outputs,
                          "--skip-checksum")

    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(bad) in lines[0] and expected in lines[0], lines[0]
    assert tree_digest(good_outputs) == before


def test_checksum_mismatch_is_refused_unless_skipped(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "book.csv", slices(small_book()))
    out = tmp_path / "prepared"
    rc, _, err = run_prep(capsys, "--csv", csv_path, "--out", out)
    assert rc == 2 and "does not match the original CSV" in err and "--skip-checksum" in err
    assert not out.exists()
    rc, _, err = run_prep(capsys, "--csv", csv_path, "--out", out, "--skip-checksum",
                          "--max-tokens", "64", "--eval-fraction", "0.3")
    assert rc == 0, err


def test_cli_exit_code_and_message_through_a_real_process(tmp_path):
    missing = tmp_path / "nope.csv"
    proc = subprocess.run([sys.executable, "-m", "data_prep", "--csv", str(missing)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"data_prep: error: {missing}: file not found; check the --csv path")


def test_clean_mode_on_a_small_book(good_outputs):
    train = [json.loads(line)["text"] for line in (good_outputs / "clean/train.jsonl").open()]
    held = [json.loads(line)["text"] for line in (good_outputs / "clean/eval.jsonl").open()]
    stats = json.loads((good_outputs / "clean/stats.json").read_text())
    everything = "\n".join(train + held)
    assert not any(marker in everything for marker in BOILERPLATE)
    assert "_Elizabeth_" not in everything and "Elizabeth" in everything
    assert "lake and thought" in everything  # hard wraps joined
    assert max(count_tokens(train + held)) <= 64
    assert stats["sections"] == 6 and 1 <= len(stats["eval_sections"]) < 6
    # whole chapters: each held-out chapter's heading starts an eval passage, none in train
    for title in stats["eval_sections"]:
        assert any(p.startswith(title + "\n") for p in held)
        assert not any(p.startswith(title + "\n") for p in train)


# ----------------------------------------------------------------------------------------------
# The real CSV


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    csv_path = real_csv_or_skip()
    root = tmp_path_factory.mktemp("real-prep")
    for name in ("a", "b"):
        assert main(["--mode", "both", "--csv", str(csv_path), "--out", str(root / name)]) == 0
    assert main(["--mode", "clean", "--csv", str(csv_path), "--out", str(root / "seed7"),
                 "--seed", "7"]) == 0
    return root


def read_jsonl(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    assert all(set(r) == {"text"} and r["text"].strip() for r in rows)
    return [r["text"] for r in rows]


def test_real_clean_has_no_boilerplate_and_respects_token_limit(real_runs):
    out = real_runs / "a" / "clean"
    train, held = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    for text in train + held:
        assert not any(marker in text for marker in BOILERPLATE), text[:200]
    assert max(count_tokens(train + held)) <= 512
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input"]["sha256"].startswith("5b2759e5")
    assert stats["train"]["tokens_per_row"]["max"] <= 512
    assert 0.08 <= stats["eval_token_share"] <= 0.2
    assert stats["sections"] == 28  # 4 letters + 24 chapters
    assert train[0].startswith("Letter 1\n\nTo Mrs. Saville, England.")


def test_real_clean_eval_text_never_appears_in_train(real_runs):
    out = real_runs / "a" / "clean"
    train_text = "\n".join(read_jsonl(out / "train.jsonl"))
    for passage in read_jsonl(out / "eval.jsonl"):
        for sentence in passage.split(". "):
            if len(sentence) > 80:  # short stock phrases may legitimately recur in the book
                assert sentence not in train_text, sentence


def test_real_outputs_are_deterministic_and_seeded(real_runs):
    a, b = tree_digest(real_runs / "a"), tree_digest(real_runs / "b")
    assert a == b
    other = tree_digest(real_runs / "seed7")
    assert other["clean/eval.jsonl"] != a["clean/eval.jsonl"]


def test_real_seed_mode_keeps_all_481_rows_split_80_20(real_runs):
    csv_path = real_csv_or_skip()
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        original = [r["text"] for r in csv.DictReader(handle)]
    out = real_runs / "a" / "seed"
    train, held = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(original) == 481
    assert sorted(train + held) == sorted(original)  # rows unchanged, none lost
    assert (len(train), len(held)) == (385, 96)


def test_second_run_is_a_no_op(real_runs, capsys):
    out = real_runs / "a"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    rc = main(["--mode", "both", "--csv", str(real_csv_or_skip()), "--out", str(out)])
    assert rc == 0 and "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == before


# ----------------------------------------------------------------------------------------------
# The same book with other line endings or a byte-order mark


def saved_as(text: str, variant: str) -> bytes:
    """`text` (LF line endings) as another editor would save it."""
    newline = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}[variant.removeprefix("bom-")]
    data = text.replace("\n", newline).encode("utf-8")
    return b"\xef\xbb\xbf" + data if variant.startswith("bom-") else data


def test_line_endings_and_bom_read_the_same_rows(tmp_path):
    text = 'text\n"Chapter 1\n\nIt was a dark night;\nthe wind rose."\nplain row\n'
    rows = {}
    for variant in ("lf", "crlf", "cr", "bom-lf", "bom-crlf"):
        path = tmp_path / f"{variant}.csv"
        path.write_bytes(saved_as(text, variant))
        rows[variant] = read_rows(path)
    assert rows["lf"] == ["Chapter 1\n\nIt was a dark night;\nthe wind rose.", "plain row"]
    assert all(r == rows["lf"] for r in rows.values()), rows


def test_the_book_with_other_line_endings_or_a_bom_gives_byte_identical_outputs(tmp_path):
    """The real CSV where it is here (its CRLF and BOM copies then pass the checksum too), else
    the synthetic book; both modes."""
    source = find_real_csv() or write_synthetic_book(tmp_path / "synthetic.csv")
    text = source.read_bytes().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    skip = [] if find_real_csv() else ["--skip-checksum"]
    digests = {}
    for variant in ("lf", "crlf", "bom-crlf"):
        csv_path = tmp_path / variant / "frankenstein_chunks.csv"
        csv_path.parent.mkdir()
        csv_path.write_bytes(saved_as(text, variant))
        out = tmp_path / f"prepared-{variant}"
        assert main(["--mode", "both", "--csv", str(csv_path), "--out", str(out), *skip]) == 0
        digests[variant] = tree_digest(out)
    assert sorted(digests["lf"]) == ["clean/eval.jsonl", "clean/stats.json", "clean/train.jsonl",
                                     "seed/eval.jsonl", "seed/stats.json", "seed/train.jsonl"]
    assert digests["crlf"] == digests["lf"] and digests["bom-crlf"] == digests["lf"]
    seed_rows = (tmp_path / "prepared-crlf" / "seed" / "train.jsonl").read_text()
    assert "\\r" not in seed_rows  # no carriage return left in the training text


# ----------------------------------------------------------------------------------------------
# Nothing dropped or changed without a word: control characters, an unclosed quote, and every
# row checked against Python's csv module (tests/test_data_prep_properties.py generates more)

# (file content, the exact error line; `…/` stands for the test's temporary folder); each is a
# row of docs/bad-inputs.md, byte for byte
EXACT_BAD_INPUTS = {
    "NUL inside a row": (
        'text\n"It was on a dreary night\x00 of November"\nplain row\n',
        "data_prep: error: …/nul.csv: line 2, column 26 holds the control character U+0000 "
        "(NUL); delete it (a control byte in a CSV means a damaged or non-text file) and re-save "
        "the file as UTF-8 text"),
    "BEL and VT": (
        "text\nthe bell\x07 tolled\nfine\x0b\n",
        "data_prep: error: …/bel.csv: line 2, column 9 holds the control character U+0007 "
        "(BEL); delete it (a control byte in a CSV means a damaged or non-text file) and re-save "
        "the file as UTF-8 text"),
    "unclosed quote": (
        'text,note\nIt was on a dreary night,"a note\nof November\n',
        "data_prep: error: …/unclosed.csv: a quoted field in the row starting on line 2 is never "
        "closed (its quote runs to the end of the file); close it, and write each `\"` inside a "
        "quoted field as `\"\"`"),
}
FILE_NAMES = {"NUL inside a row": "nul.csv", "BEL and VT": "bel.csv",
              "unclosed quote": "unclosed.csv"}


@pytest.mark.parametrize("case", sorted(EXACT_BAD_INPUTS))
@pytest.mark.parametrize("mode", ["seed", "clean"])
def test_control_characters_and_an_unclosed_quote_are_one_exact_line(case, mode, tmp_path,
                                                                      capsys, good_outputs):
    content, message = EXACT_BAD_INPUTS[case]
    bad = tmp_path / FILE_NAMES[case]
    bad.write_bytes(content.encode("utf-8"))
    before = tree_digest(good_outputs)

    rc, out, err = run_prep(capsys, "--mode", mode, "--csv", bad, "--out", good_outputs,
                            "--skip-checksum")

    assert (rc, out) == (2, "")
    assert err.replace(f"{tmp_path}/", "…/") == message + "\n"
    assert tree_digest(good_outputs) == before


def test_the_book_with_a_nul_byte_in_one_row_is_refused_not_cut(tmp_path, capsys, good_outputs):
    """The report: a NUL inside one row of the book made pandas cut the field at the byte, and
    the blank-line bookkeeping then skipped real rows: 435 of 481 rows written, exit 0. Now one
    line naming where the byte is, in both modes, and earlier outputs untouched."""
    source = find_real_csv() or write_synthetic_book(tmp_path / "synthetic.csv")
    text = source.read_text(encoding="utf-8")
    with open(source, encoding="utf-8", newline="") as handle:
        rows = [r["text"] for r in csv.DictReader(handle)]
    at = text.index(rows[100]) + 20  # the 21st character of the 101st row
    line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
    bad = tmp_path / "frankenstein_chunks.csv"
    bad.write_text(text[:at] + "\x00" + text[at:], encoding="utf-8")
    before = tree_digest(good_outputs)
    for mode in ("seed", "clean", "both"):
        rc, out, err = run_prep(capsys, "--mode", mode, "--csv", bad, "--out", good_outputs,
                                "--skip-checksum")
        assert (rc, out) == (2, ""), out
        assert err == (f"data_prep: error: {bad}: line {line}, column {column} holds the control "
                       "character U+0000 (NUL); delete it (a control byte in a CSV means a "
                       "damaged or non-text file) and re-save the file as UTF-8 text\n")
        assert tree_digest(good_outputs) == before


def test_a_row_read_differently_by_pandas_is_one_line_naming_it(tmp_path, capsys, good_outputs,
                                                                monkeypatch):
    """The cross-check itself, with pandas made to cut a field as its C parser did at a NUL (no
    real input is known to make pandas and the csv module disagree any more)."""
    import data_prep.csv_input as csv_input

    read = csv_input.pandas_text_column
    monkeypatch.setattr(csv_input, "pandas_text_column",
                        lambda *a: [v[:12] for v in read(*a)])
    bad = write_csv(tmp_path / "cut.csv", ["short", "It was on a dreary night of November"])
    before = tree_digest(good_outputs)

    rc, out, err = run_prep(capsys, "--mode", "seed", "--csv", bad, "--out", good_outputs,
                            "--skip-checksum")

    assert (rc, out) == (2, "")
    assert err.replace(f"{tmp_path}/", "…/") == (
        "data_prep: error: …/cut.csv: row ending on line 3 reads as 'It was on a ' with pandas "
        "but as 'It was on a dreary night of November' with Python's csv module; check the "
        "quoting there: each `\"` inside a quoted field written as `\"\"`, and a field holding a "
        "comma or a line break quoted\n")
    assert tree_digest(good_outputs) == before


def test_every_new_message_is_in_the_bad_input_matrix_byte_for_byte():
    doc = (REPO / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    for _, message in EXACT_BAD_INPUTS.values():
        assert f"`` {message} ``" in doc or f"`{message}`" in doc, message
