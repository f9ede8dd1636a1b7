"""`python -m eval.generate`: the memorisation check and a real side-by-side run."""

from __future__ import annotations

import json

import pytest
from _eval_helpers import REPO, adapter_dir, tiny_model_dir, write_jsonl

from eval.generate import TrainingIndex, main, normalise_words, prompt_variants

# Public-domain Frankenstein text as the "training data".
TRAIN = [
    "It was on a dreary night of November that I beheld the accomplishment of my toils. With "
    "an anxiety that almost amounted to agony, I collected the instruments of life around me, "
    "that I might infuse a spark of being into the lifeless thing that lay at my feet.",
    "It was already one in the morning; the rain pattered dismally against the panes, and my "
    "candle was nearly burnt out, when, by the glimmer of the half-extinguished light, I saw "
    "the dull yellow eye of the creature open; it breathed hard, and a convulsive motion "
    "agitated its limbs.",
]


@pytest.fixture(scope="module")
def index():
    return TrainingIndex(TRAIN)


def test_copied_passage_has_share_one(index):
    # Across the row boundary too: rows are joined in file order.
    copied = ("infuse a spark of being into the lifeless thing that lay at my feet. It was "
              "already one in the morning")
    assert index.share(copied)["share"] == 1.0


def test_normalisation_ignores_case_punctuation_and_quote_style(index):
    variant = ("IT WAS ALREADY ONE IN THE MORNING -- the rain pattered dismally against the "
               "panes!!! and my candle was nearly burnt out")
    result = index.share(variant)
    assert result["share"] == 1.0 and result["n_ngrams"] == len(normalise_words(variant)) - 7
    assert normalise_words("Don\u2019t _Stop_, it\u2019s   NOT-over") == [
        "don't", "stop", "it's", "not", "over"]


def test_own_text_has_share_zero(index):
    control = (REPO / "eval" / "control_passage.txt").read_text()
    result = index.share(control)
    assert result["share"] == 0.0 and result["n_ngrams"] > 1000


def test_short_generation_has_no_share(index):
    assert index.share("It was on a dreary night")["share"] is None
    assert index.share("")["share"] is None
    # One 8-gram copied out of two: half.
    assert index.share("on a dreary night of November that I sang")["share"] == 0.5


def test_trailing_space_prompt_gets_a_stripped_variant():
    assert prompt_variants(["I'm afraid I've created a ", "No space"]) == [
        ("I'm afraid I've created a ", "as given"),
        ("I'm afraid I've created a", "trailing whitespace stripped"),
        ("No space", "as given"),
    ]


def test_generate_base_and_adapter_side_by_side(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir()), "--adapter", str(adapter_dir("nonzero")),
            "--prompt", "I'm afraid I've created a ", "--max-new-tokens", "12",
            "--samples", "1", "--seed", "7", "--train", str(train), "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "generations.json").read_text())
    records = result["generations"]
    assert len(records) == 2 * 2 * 2  # (as given, stripped) x (greedy, sample) x (base, adapter)
    assert {r["model"] for r in records} == {"base", "adapter"}
    assert {(r["mode"], r["seed"]) for r in records} == {("greedy", None), ("sample", 7)}
    for r in records:
        assert 1 <= r["n_new_tokens"] <= 12
        assert r["memorisation"]["share"] is None or 0.0 <= r["memorisation"]["share"] <= 1.0
    greedy = {r["model"]: r["text"] for r in records
              if r["mode"] == "greedy" and r["prompt_variant"] == "as given"}
    assert greedy["base"] != greedy["adapter"]  # nonzero LoRA B changes the model
    md = (out / "generations.md").read_text()
    assert "\"I'm afraid I've created a \"" in md  # the prompt exactly as given
    assert "trailing whitespace stripped" in md and "| greedy |" in md

    # Seeded sampling is reproducible: a second run gives the same texts.
    out2 = tmp_path / "out2"
    assert main([*argv[:-1], str(out2)]) == 0
    again = json.loads((out2 / "generations.json").read_text())["generations"]
    assert [r["text"] for r in again] == [r["text"] for r in records]


def test_missing_training_text_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--model", str(tiny_model_dir()), "--train", str(tmp_path / "train.jsonl"),
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "train.jsonl" in err[0] and "--no-memorisation" in err[0]
    assert not out.exists()
