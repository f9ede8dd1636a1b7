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


# -- batched generation -------------------------------------------------------------------------


def _tiny_float64(adapter: bool = True):
    """The tiny model (+ nonzero LoRA) in float64: padding changes the shapes of the matrix
    products, and float64 keeps that rounding far below any logit gap, so an argmax cannot flip."""
    from eval.common import load_model, load_tokenizer

    model = load_model(str(tiny_model_dir()), adapter_dir("nonzero") if adapter else None)
    return model.double(), load_tokenizer(str(tiny_model_dir()))


def _args(**kw):
    import argparse

    return argparse.Namespace(**{"max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, **kw})


def _one_at_a_time_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """The previous implementation: one unpadded prompt per generate() call, do_sample=False."""
    import torch
    from transformers import GenerationConfig

    from eval.common import encode

    ids = encode(tok, [prompt])[0][0]
    input_ids = torch.tensor([ids])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_batched_greedy_equals_one_prompt_at_a_time():
    from eval.common import base_model_context
    from eval.generate import DEFAULT_PROMPTS, generate_rows

    model, tok = _tiny_float64()
    prompts = [p for p, _ in prompt_variants(list(DEFAULT_PROMPTS))]  # 6 lengths: real padding
    for context in (base_model_context, None):  # base (adapter disabled), then base + adapter
        with context(model) if context else _nullcontext():
            # greedy and sampled rows mixed in the one batch, as eval.generate runs them
            rows = [{"prompt": p, "seed": None} for p in prompts]
            rows += [{"prompt": p, "seed": 11 + i} for i, p in enumerate(prompts)]
            timing = generate_rows(model, tok, rows, _args())
            assert timing["batches"] == 1 and timing["new_tokens"] > 0
            for row in rows[: len(prompts)]:
                assert row["text"] == _one_at_a_time_greedy(model, tok, row["prompt"], 16), row
                assert row["n_new_tokens"] == 16 or row["stopped_at_eos"]


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_a_sample_is_the_same_alone_or_in_any_batch():
    from eval.generate import DEFAULT_PROMPTS, generate_rows

    model, tok = _tiny_float64()
    prompt = DEFAULT_PROMPTS[1]
    alone = [{"prompt": prompt, "seed": 5}]
    generate_rows(model, tok, alone, _args())
    others = [{"prompt": p, "seed": s} for p in DEFAULT_PROMPTS for s in (None, 1, 2)]
    for batch_size in (0, 2, 5):
        rows = [dict(r) for r in others] + [{"prompt": prompt, "seed": 5}]
        generate_rows(model, tok, rows, _args(), batch_size=batch_size)
        assert rows[-1]["text"] == alone[0]["text"], batch_size
    # another seed draws another continuation; a tiny top-p leaves only the argmax
    other_seed = [{"prompt": prompt, "seed": 6}]
    generate_rows(model, tok, other_seed, _args())
    assert other_seed[0]["text"] != alone[0]["text"]
    nucleus_of_one = [{"prompt": prompt, "seed": 5}]
    generate_rows(model, tok, nucleus_of_one, _args(top_p=1e-9))
    assert nucleus_of_one[0]["text"] == _one_at_a_time_greedy(model, tok, prompt, 16)


def test_per_row_sampler_draws_from_the_temperature_and_top_p_distribution():
    import math

    import torch

    from eval.generate import sampler_class

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().repeat(2, 1)  # row 0 greedy, row 1 sampled
    counts = torch.zeros(4)
    sampler = sampler_class()([None, 123], temperature=1.0, top_p=0.7, device="cpu")
    for _ in range(4000):
        out = sampler(None, scores.clone())
        assert torch.equal(out[0], scores[0])  # the greedy row passes through untouched
        assert (out[1] == 0).sum() == 1 and torch.isinf(out[1]).sum() == 3  # one token forced
        counts[out[1].argmax()] += 1
    # top-p 0.7 keeps 0.5 and 0.3 (the mass before 0.3 is 0.5 < 0.7; before 0.15 it is 0.8)
    assert counts[2] == counts[3] == 0
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    # temperature 2 flattens: p ~ sqrt(probs), all four tokens kept with top-p 1
    counts = torch.zeros(4)
    sampler = sampler_class()([7], temperature=2.0, top_p=1.0, device="cpu")
    for _ in range(4000):
        counts[sampler(None, probs.log()[None].clone())[0].argmax()] += 1
    flat = probs.sqrt() / probs.sqrt().sum()
    assert counts.tolist() == pytest.approx([4000 * float(f) for f in flat], abs=4000 * 0.03)
    assert not math.isclose(counts[0] / 4000, 0.5, abs_tol=0.03)


def test_generations_record_speed_and_batches(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir()), "--prompt", "It was on a dreary night",
                 "--prompt", "My dear Elizabeth,", "--max-new-tokens", "6", "--samples", "2",
                 "--no-memorisation", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "generations.json").read_text())
    timing = result["timing"]
    assert result["schema_version"] == 2 and result["settings"]["batch_size"] == 4
    assert timing["batches"] == 2  # 2 prompts x (greedy + 2 samples) = 6 rows, 4 a batch
    assert timing["new_tokens"] == sum(r["n_new_tokens"] for r in result["generations"])
    assert timing["tokens_per_s"] == pytest.approx(timing["new_tokens"] / timing["seconds"],
                                                   rel=0.01)
    assert f"{timing['new_tokens']} new tokens in" in printed and "tokens/s" in printed
    assert "tokens/s" in (out / "generations.md").read_text()
