"""bench.time_to_adapter on a real `axolotl train` of the tiny recipe, with fast_steps' compiled
decoder layers on: the breakdown accounts for the whole wait and counts what the run did, and
the compiled layers train exactly like the session's uncompiled run of the same recipe.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from core.files import read_jsonl

STEPS = 3
EVAL_ROWS = 4  # a few held-out passages: CPU evaluation is slow and not what is tested here


def trainer_state(out_dir):
    state = max(out_dir.glob("checkpoint-*/trainer_state.json"),
                key=lambda p: int(p.parent.name.split("-")[-1]))
    return json.loads(state.read_text())["log_history"]


@pytest.fixture(scope="module")
def timed_run(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("tta")
    eval_rows = (REPO / "data/prepared/clean/eval.jsonl").read_text().splitlines()[:EVAL_ROWS]
    (work / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")
    sets = {
        "plugins": "[integrations.recipe_guard.RecipeGuardPlugin, "
                   "integrations.fast_steps.FastStepsPlugin]",
        "fast_steps_compile": "true", "fast_steps_packed_layout": "false",
        "fast_steps_bf16_lora": "false", "max_steps": str(STEPS), "eval_steps": "2",
        "save_steps": "2",
        "test_datasets": f"[{{path: {work / 'eval.jsonl'}, ds_type: json, type: completion, "
                         "split: train}]",
    }
    results = work / "tta.jsonl"
    argv = [sys.executable, "-m", "bench.time_to_adapter", "--model", str(tiny_model),
            "--recipe", str(REPO / "recipes/tiny-mistral-cpu.yml"), "--label", "tiny",
            "--work-dir", str(work), "--results", str(results)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = read_jsonl(results)
    return result, work / "tiny" / "out"


def test_breakdown_accounts_for_the_whole_wait(timed_run):
    result, out = timed_run
    assert result["status"] == "ok" and (out / "adapter_model.safetensors").is_file()
    parts = result["parts"]
    assert all(seconds >= 0 for seconds in parts.values()), parts
    assert sum(parts.values()) == pytest.approx(result["time_to_adapter_s"], abs=0.01)
    assert parts["launchers_s"] > 0 and parts["model_load_s"] > 0


def test_breakdown_counts_what_the_run_did(timed_run):
    result, out = timed_run
    history = trainer_state(out)
    assert result["steps"] == STEPS == max(h["step"] for h in history)
    assert result["evaluations"] == sum("eval_loss" in h for h in history) >= 2
    assert result["checkpoints"] == len(list(out.glob("checkpoint-*"))) >= 1
    assert result["eval_losses"] == [h["eval_loss"] for h in history if "eval_loss" in h]


def test_compiled_layers_train_like_the_uncompiled_recipe(timed_run, tiny_trained):
    """Same seed, data and LoRA initialisation as the session's run of the same recipe: the first
    steps' losses agree to fp32 rounding (Inductor orders some sums differently)."""
    _, out = timed_run
    report = json.loads((out / "fast_steps_compile.json").read_text())
    # no graph break; two compiled functions for all layers (twice: the first layer's input
    # needs no gradient)
    assert report["graph_breaks"] == 0 and report["resumed_frames"] == 0, report
    assert report["compiled_frames"] <= 4, report
    assert report["compiled_calls"] == report["layers"] * STEPS  # one micro-batch a step
    assert report["eager_calls"] > 0  # evaluation ran the stock forward
    compiled = [h["loss"] for h in trainer_state(out) if "loss" in h][:STEPS]
    eager = [h["loss"] for h in trainer_state(tiny_trained.output_dir) if "loss" in h][:STEPS]
    assert compiled == pytest.approx(eager, rel=1e-4)
