"""`python -m eval.report` on a run directory holding a real adapter, real eval outputs and a
trainer_state.json shaped like Hugging Face's (input data written here, not a mock)."""

from __future__ import annotations

import json
import shutil

from _eval_helpers import REPO, TEXTS, adapter_dir, tiny_model_dir, write_jsonl

from eval import generate, perplexity, report
from eval.common import fmt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trainer_state(steps: int, eval_every: int) -> dict:
    history = []
    for step in range(1, steps + 1):
        history.append({"epoch": step / steps, "grad_norm": 1.5, "learning_rate": 2e-4,
                        "loss": round(3.0 - 0.1 * step, 4), "step": step})
        if step % eval_every == 0:
            history.append({"epoch": step / steps, "eval_loss": round(3.1 - 0.08 * step, 4),
                            "eval_runtime": 1.2, "eval_samples_per_second": 10.0, "step": step})
    history.append({"epoch": 1.0, "step": steps, "total_flos": 1.0, "train_loss": 2.5,
                    "train_runtime": 40.0})
    return {"global_step": steps, "max_steps": steps, "log_history": history,
            "best_metric": None, "epoch": 1.0}


def test_report_gathers_losses_perplexity_and_generations(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir("nonzero"), run)
    # checkpoint-10 is newer than checkpoint-2 although it sorts first as text
    for steps in (2, 10):
        (run / f"checkpoint-{steps}").mkdir()
        (run / f"checkpoint-{steps}" / "trainer_state.json").write_text(
            json.dumps(trainer_state(steps, eval_every=5 if steps == 10 else 1)))
    data = write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    common = ["--model", str(tiny_model_dir()), "--adapter", str(run)]
    assert perplexity.main([*common, "--compare", "--data", str(data), "--control",
                            str(REPO / "eval" / "control_passage.txt"), "--max-rows", "4",
                            "--window", "64", "--stride", "32", "--no-progress"]) == 0
    assert generate.main([*common, "--prompt", "My dear Elizabeth,", "--max-new-tokens", "8",
                          "--train", str(data)]) == 0
    assert report.main([str(run)]) == 0

    md = (run / "report.md").read_text()
    for png in ("loss.png", "perplexity.png"):
        assert (run / "report" / png).read_bytes().startswith(PNG_MAGIC)
        assert f"(report/{png})" in md
    assert "checkpoint-10/trainer_state.json" in md
    assert "| 10 | 2.0000 | 2.3000 |" in md  # last step: train 3.0 - 1.0, eval 3.1 - 0.8
    ppl = json.loads((run / "eval" / "perplexity.json").read_text())
    for ds in ppl["datasets"]:
        for label in ("base", "adapter"):
            assert fmt(ds["metrics"][label]["sliding_ppl"]) in md
        assert f"{ds['relative_change_pct']['sliding_ppl']:+.1f} %" in md
    assert "Held-out vs control" in md
    gens = json.loads((run / "eval" / "generations.json").read_text())
    first = gens["generations"][0]["text"].strip().splitlines()[0]
    assert first.replace("|", "\\|") in md

    # A second run replaces the report in place and leaves no staging folders behind.
    assert report.main([str(run)]) == 0
    assert not [p for p in run.iterdir() if p.name.startswith(".report")]


def test_top_level_trainer_state_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps(trainer_state(4, eval_every=2)))
    assert report.main([str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "Train loss 2.9000 (step 1) -> 2.6000 (step 4)" in md
    assert "Not available: perplexity, generations" in md
    assert (run / "report" / "loss.png").is_file()
    assert not (run / "report" / "perplexity.png").exists()


def test_report_bad_input(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert "nothing to report" in capsys.readouterr().err
    (empty / "checkpoint-3").mkdir()
    (empty / "checkpoint-3" / "trainer_state.json").write_text("{not json")
    assert report.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-3/trainer_state.json" in err[0]
    assert sorted(p.name for p in empty.iterdir()) == ["checkpoint-3"]  # nothing written
