"""The perplexity math against hand computations with plain torch (CPU, tiny real model)."""

from __future__ import annotations

import math

import pytest
from _eval_helpers import TEXTS, hand_token_nll, load_tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def rows(tiny):
    from eval.common import encode

    _, tok = tiny
    ids, prefix = encode(tok, TEXTS)
    assert prefix is None  # the Mistral tokenizer adds BOS itself
    assert all(r[0] == tok.bos_token_id for r in ids)
    assert len({len(r) for r in ids}) == len(ids)  # unequal lengths, so padding happens
    return ids


def test_corpus_perplexity_equals_hand_computation(tiny, rows):
    from eval.perplexity import row_metrics, score_rows

    model, _ = tiny
    per_row, stats = score_rows(model, rows, window=256, stride=128, batch_size=3)
    hand = [hand_token_nll(model, ids) for ids in rows]
    total = sum(sum(h) for h in hand)
    n_tokens = sum(len(ids) - 1 for ids in rows)  # BOS is never predicted
    assert stats.scored_tokens == n_tokens
    for got, want in zip(per_row, hand, strict=True):
        assert got == pytest.approx(want, abs=TOL)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    n_words = sum(len(t.split()) for t in TEXTS)
    metrics = row_metrics(per_row, n_bytes, n_words)
    assert metrics["corpus_ppl"] == pytest.approx(math.exp(total / n_tokens), rel=TOL)
    assert metrics["corpus_bits_per_byte"] == pytest.approx(total / (math.log(2) * n_bytes),
                                                            rel=TOL)
    assert metrics["corpus_word_ppl"] == pytest.approx(math.exp(total / n_words), rel=TOL)
    # A non-uniform model: the test would notice a shifted target.
    assert max(max(h) for h in hand) - min(min(h) for h in hand) > 1.0


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_scores_do_not_depend_on_batch_size_or_padding_side(tiny, rows, batch_size,
                                                            padding_side):
    from eval.perplexity import score_rows

    model, tok = tiny
    reference = [hand_token_nll(model, ids) for ids in rows]
    per_row, _ = score_rows(model, rows, window=256, stride=128, batch_size=batch_size,
                            pad_id=tok.pad_token_id or 0, padding_side=padding_side)
    for got, want in zip(per_row, reference, strict=True):
        assert len(got) == len(want)
        assert got == pytest.approx(want, abs=TOL)


def test_notebook_metric_is_mean_of_row_exp_losses(tiny, rows):
    """The notebook called model(ids, labels=ids).loss per row; compare with that."""
    import torch

    from eval.perplexity import row_metrics, score_rows

    model, _ = tiny
    with torch.no_grad():
        losses = [model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
                  for ids in rows]
    per_row, _ = score_rows(model, rows, window=256, stride=128, batch_size=2)
    metrics = row_metrics(per_row, n_bytes=sum(len(t.encode()) for t in TEXTS),
                          n_words=sum(len(t.split()) for t in TEXTS))
    want = sum(math.exp(loss) for loss in losses) / len(losses)
    assert metrics["notebook_mean_row_ppl"] == pytest.approx(want, rel=TOL)
    assert metrics["notebook_mean_row_ppl"] != pytest.approx(metrics["corpus_ppl"], rel=TOL)


def test_sliding_window_with_stride_equal_to_window_is_disjoint_chunks(tiny):
    from eval.common import encode
    from eval.perplexity import score_stream

    model, tok = tiny
    ids = encode(tok, [" ".join(TEXTS * 2)])[0][0]
    window = 16
    got, stats = score_stream(model, ids, window=window, stride=window, batch_size=4)
    want = [x for start in range(0, len(ids), window)
            for x in hand_token_nll(model, ids[start : start + window])]
    assert len(got) == len(want) == len(ids) - math.ceil(len(ids) / window)
    assert got == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize("stride", [1, 3, 7, 15])
def test_smaller_stride_scores_each_token_once_with_bounded_context(stride):
    from eval.scoring import sliding_windows

    n, window = 53, 16
    spans = sliding_windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert sorted(scored) == list(range(1, n))  # every token but the first, exactly once
    for begin, end, first in spans:
        assert end - begin <= window
        for t in range(first, end):
            context = t - begin
            assert 1 <= context <= window - 1
            assert context >= min(t, window - stride)


def test_sliding_window_matches_hand_computation_with_overlap(tiny):
    from eval.common import encode
    from eval.perplexity import score_stream
    from eval.scoring import sliding_windows

    model, tok = tiny
    ids = encode(tok, [" ".join(TEXTS)])[0][0]
    window, stride = 12, 5
    got, _ = score_stream(model, ids, window=window, stride=stride, batch_size=3,
                          padding_side="left")
    want = []
    for begin, end, first in sliding_windows(len(ids), window, stride):
        want += hand_token_nll(model, ids[begin:end])[first - begin - 1 :]
    assert len(got) == len(ids) - 1
    assert got == pytest.approx(want, abs=TOL)


def test_bad_window_settings_are_rejected():
    from eval.scoring import sliding_windows

    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)  # would skip tokens
    with pytest.raises(ValueError, match="window"):
        sliding_windows(10, 1, 1)
    assert sliding_windows(1, 4, 2) == []
