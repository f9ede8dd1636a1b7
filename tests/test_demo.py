"""make demo, shortened: the same `python -m demo` code path (data prep, SmolLM2 cache, a real
`axolotl train`, perplexity, generations, report) with 6 training steps and fewer eval rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, book_csv_args


@pytest.mark.slow
def test_shortened_demo_trains_improves_and_reports(prepared_data, tmp_path):
    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with open(log, "w") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "demo", "--output-dir", str(out), "--max-steps", "6",
             "--max-eval-rows", "6", "--max-new-tokens", "16", *book_csv_args()],
            cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=1200)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]

    # a real axolotl run wrote the adapter
    assert (out / "adapter_model.safetensors").stat().st_size > 1_000_000
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6

    # held-out perplexity went down; the control passage was scored too
    summary = json.loads((out / "demo_summary.json").read_text())
    held = summary["held_out_corpus_ppl"]
    assert held["adapter"] < held["base"], held
    assert summary["control_corpus_ppl"]["base"] > 1
    assert summary["tokens_trained"] > 1000

    # report files, and the five-line summary printed last
    for name in ("report.md", "report/loss.png", "report/perplexity.png",
                 "eval/perplexity.json", "eval/generations.json"):
        assert (out / name).stat().st_size > 0, name
    assert "I'm afraid I've created a" in (out / "report.md").read_text()
    tail = text.strip().splitlines()[-5:]
    assert tail[0].startswith("held-out Frankenstein perplexity:")
    assert tail[-1].startswith("report:") and tail[-1].endswith("report.md")
