"""integrations.packed_eval: packed held-out evaluation scores the same tokens with the same loss
as unpacked evaluation, on the session's really trained tiny adapter, through Axolotl's own
loaders, collators and Trainer (tests/_packed_eval_probe.py).

Tolerance: 1e-5 relative. Both ways compute the same fp32 cross-entropy of the same tokens;
they differ only in how rows are laid out (one passage per 1,024-token padded row vs passages
side by side behind a block-diagonal mask), so the matrix products and softmaxes accumulate in
a different order: rounding of about 1e-7 relative per value, far below 1e-5. Without the
plugin the two differ by far more (a passage start scored in packed rows only, and the mean of
per-row means weighing rows unequally), which the test also shows, so it can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from integrations.packed_eval.plugin import (
    IGNORE,
    expected_scored_tokens,
    mask_passage_starts,
    scored_tokens,
)

TOLERANCE = 1e-5


def test_passage_starts_masked_in_packed_rows_only():
    labels = torch.tensor([[5, 6, 7, 8, 9, 10, IGNORE]])
    packed = {"labels": labels.clone(), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0]])}
    # passages start at 0, 3 and 5 (the last one is padding): their labels are never targets
    assert mask_passage_starts(packed)["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE,
                                                               IGNORE]]
    unpacked = {"labels": labels.clone()}  # no position_ids: one passage a row, unchanged
    assert mask_passage_starts(unpacked)["labels"].tolist() == labels.tolist()
    assert int(scored_tokens(labels)) == 5  # after the first position, not IGNORE
    assert expected_scored_tokens({"labels": [[1, 2, 3], [4, IGNORE, 5]]}) == 3


@pytest.fixture(scope="module")
def probe(tiny_trained, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("packed-eval")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_packed_eval_probe.py"),
         str(REPO / "recipes" / "tiny-mistral-cpu.yml"), str(tiny_trained.output_dir),
         str(work)], cwd=REPO, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


def test_packed_evaluation_equals_unpacked_with_the_plugin(probe):
    unpacked, packed = probe["unpacked+plugin"], probe["packed+plugin"]
    assert packed["scored_tokens"] == unpacked["scored_tokens"] > 10_000
    assert packed["eval_loss"] == pytest.approx(unpacked["eval_loss"], rel=TOLERANCE)


def test_without_the_plugin_packed_evaluation_differs(probe):
    """What the plugin fixes is real: Axolotl's packed rows score each passage start (the BOS
    after the previous passage's EOS), and the Trainer averages per-row means."""
    plain_packed, plain_unpacked = probe["packed"], probe["unpacked"]
    assert plain_packed["scored_tokens"] > plain_unpacked["scored_tokens"]
    assert plain_packed["eval_loss"] != pytest.approx(plain_unpacked["eval_loss"],
                                                      rel=10 * TOLERANCE)


def test_a_packing_that_leaves_passages_out_is_refused(probe):
    """Axolotl's packed evaluation with 2 rows a micro-batch scores one passage fewer here:
    the plugin stops before training with one line instead of reporting a partial loss."""
    error = probe["packed+plugin mbs2"].get("error", "")
    assert error.startswith("integrations.packed_eval.PackedEvalPlugin: the evaluation batches "
                            "score "), probe["packed+plugin mbs2"]
    assert "set `micro_batch_size: 1` or `eval_sample_packing: false`" in error
