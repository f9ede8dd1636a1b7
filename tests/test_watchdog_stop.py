"""A run that training stopped early is a failure, and every later command says so.

One real `axolotl train` of the tiny recipe whose loss watchdog threshold (1.0) is below the
real loss (a random-init model starts near ln(32000) = 10.4), patience 2: Axolotl's watchdog
stops it at step 3 of 6. Axolotl alone then saves the adapter, prints "Training completed!" and
exits 0. With the recipe guard (integrations/recipe_guard/stops.py) it ends with one `error:`
line (what crossed which threshold at which step, what to try), the checkpoints stay, and
output_dir/stopped_early.json records the stop; `python -m eval`, `axolotl merge-lora` and
`python -m export` then stop with one line each unless told to go on (`--allow-stopped`;
RECIPE_GUARD_ALLOW_STOPPED=1 for axolotl). Training the same output_dir again to the end removes
the record.

Costs 45-55 s for the stopped training on 2 busy cores (3 steps; about 30 s of it is start-up;
the session run's prepared dataset is reused), about 2.5 min with the commands after it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, axolotl, write_recipe

from core.errors import UserError
from core.runs import (
    STOPPED_EARLY_JSON,
    checkpoint_complete,
    clear_stop_record,
    read_stop_record,
    refuse_stopped,
    write_stop_record,
)

TIMEOUT_S = 600
ERROR_LINE = re.compile(r"^(?:[\w.]+: )?error: ")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR_LINE.match(line)]


def run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def downstream_line(out: Path | str, summary: str, go_on: str) -> str:
    return (f"{out}: training stopped early ({summary}); what it saved is not a finished run, "
            f"so train again ({STOPPED_EARLY_JSON} there says what to try) or {go_on} to use it "
            "anyway")


# The lines of this run; only the loss (the same on one machine, run after run) is left open.
# docs/bad-inputs.md shows them with the loss measured here and `…/out` for the run directory.
SUMMARY = ("the loss stayed above loss_watchdog_threshold 1.0 for 2 steps in a row, {loss} at "
           "step 2, so Axolotl's loss watchdog stopped training at step 3 of 6")
TRAIN_LINE = ("error: " + SUMMARY + "; {short} is about ln(32000) = 10.37, the loss of a model "
              "that has learned nothing: check that base_model is a pretrained model (for a "
              "random-init one, remove loss_watchdog_threshold or set it above 10.4) and train "
              "again. The checkpoints are kept in {out}, and stopped_early.json there marks the "
              "run as stopped early")
DOCUMENTED_LOSS = 10.3913


def lines_of(loss: float, out) -> dict[str, str]:
    summary = SUMMARY.format(loss=f"{loss:.4f}")
    return {
        "axolotl train": TRAIN_LINE.format(loss=f"{loss:.4f}", short=f"{loss:.2f}", out=out),
        "python -m eval": "error: " + downstream_line(out, summary, "pass --allow-stopped"),
        "python -m export": "export: error: " + downstream_line(out, summary,
                                                                "pass --allow-stopped"),
        "axolotl merge-lora": "error: " + downstream_line(out, summary,
                                                          "set RECIPE_GUARD_ALLOW_STOPPED=1"),
    }


def logged_loss(line: str) -> float:
    return float(re.search(r"for 2 steps in a row, ([\d.]+) at step 2", line)[1])


@dataclass
class StoppedRun:
    recipe: Path
    out: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def stopped_run(tiny_trained, tmp_path_factory) -> StoppedRun:
    root = tmp_path_factory.mktemp("watchdog")
    out = root / "out"
    recipe = write_recipe(tiny_trained.recipe, root / "watchdog.yml", output_dir=str(out),
                          loss_watchdog_threshold=1.0, loss_watchdog_patience=2, max_steps=6,
                          save_steps=2, eval_steps=None)
    return StoppedRun(recipe, out, run(axolotl("train", recipe)))


@pytest.mark.slow
def test_a_watchdog_stop_fails_axolotl_train_in_one_line_and_keeps_the_checkpoints(stopped_run):
    proc, out = stopped_run.proc, stopped_run.out
    log = proc.stdout + proc.stderr
    assert "Loss is too high, stopping training (loss_watchdog_threshold)" in log
    assert "Model successfully saved" in log  # Axolotl saved as usual ...
    assert proc.returncode != 0, log[-3000:]  # ... but the run is a failure
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    loss = logged_loss(errors[0])
    assert errors[0] == lines_of(loss, out)["axolotl train"]
    assert loss > 1.0

    # the checkpoints stay (checkpoint-2, saved before the stop), and so does the adapter
    assert checkpoint_complete(out / "checkpoint-2")
    assert (out / "adapter_model.safetensors").is_file()
    record = json.loads((out / STOPPED_EARLY_JSON).read_text())
    assert (record["reason"], record["step"], record["max_steps"]) == ("loss_watchdog", 3, 6)
    assert errors[0].startswith(f"error: {record['summary']}; {record['fix']}. ")

    # gpu-check reads the same log and says why the stage ended
    from gpu_check.logs import early_end_reason

    log_file = out.parent / "train.log"
    log_file.write_text(log)
    assert early_end_reason(log_file, proc.returncode) == "stopped by the loss watchdog at step 3"


@pytest.mark.slow
def test_eval_export_and_merge_lora_refuse_the_stopped_run_in_one_line(stopped_run, tmp_path):
    out, recipe = stopped_run.out, stopped_run.recipe
    want = lines_of(logged_loss(read_stop_record(out)["summary"]), out)

    ev = run([sys.executable, "-m", "eval", str(recipe)])
    assert ev.returncode == 2, ev.stderr[-2000:]
    assert ev.stderr.strip().splitlines() == [want["python -m eval"]]

    export = run([sys.executable, "-m", "export", str(out)])
    assert export.returncode == 2, export.stderr[-2000:]
    assert export.stderr.strip().splitlines() == [want["python -m export"]]
    # told to go on, export gets past the check (to the next input it checks)
    export = run([sys.executable, "-m", "export", str(out), "--allow-stopped", "--no-check",
                  "--converter", str(tmp_path / "missing.py")])
    assert export.returncode == 2
    assert "training stopped early" not in export.stderr
    assert f"converter {tmp_path / 'missing.py'} not found" in export.stderr

    merge = run(axolotl("merge-lora", recipe))
    assert merge.returncode != 0, merge.stdout[-2000:]
    assert error_lines(merge.stderr) == [want["axolotl merge-lora"]]
    assert "Traceback" not in merge.stderr
    assert not (out / "merged").exists()


@pytest.mark.slow
def test_told_to_go_on_eval_scores_the_stopped_run_and_its_report_says_so(stopped_run):
    ev = run([sys.executable, "-m", "eval", str(stopped_run.recipe), "--allow-stopped",
              "--skip", "generate", "--max-rows", "2", "--no-control", "--no-progress"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert (stopped_run.out / "eval" / "perplexity.json").is_file()
    report = (stopped_run.out / "report.md").read_text()
    assert f"- **Training stopped early**: {read_stop_record(stopped_run.out)['summary']}" \
        in report


@pytest.mark.slow
def test_training_the_run_again_to_the_end_clears_the_stop(stopped_run, tmp_path):
    """The fix the line suggests for a random-init model (no watchdog), on a copy of the run:
    Axolotl resumes from checkpoint-2, finishes (one step: max_steps 3), exits 0, and the record
    is gone."""
    out = tmp_path / "out"
    shutil.copytree(stopped_run.out, out)
    recipe = write_recipe(stopped_run.recipe, tmp_path / "fixed.yml", output_dir=str(out),
                          loss_watchdog_threshold=None, loss_watchdog_patience=None, max_steps=3)
    assert read_stop_record(out) is not None
    proc = run(axolotl("train", recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"resum\w* from checkpoint at \S*checkpoint-2", proc.stdout + proc.stderr)
    assert read_stop_record(out) is None
    ev = run([sys.executable, "-m", "eval", str(recipe), "--skip", "generate,report",
              "--max-rows", "1", "--no-control", "--no-progress"])
    assert ev.returncode == 0, ev.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# The record and its readers, without training


def test_the_stop_record_round_trip_and_a_broken_one_still_counts(tmp_path):
    assert read_stop_record(tmp_path) is None
    refuse_stopped(tmp_path, "pass --allow-stopped")  # no record: nothing to say
    write_stop_record(tmp_path, reason="non_finite", step=3, max_steps=20,
                      summary="grad_norm became nan at step 3",
                      fix="lower learning_rate (or check the data) and train again")
    record = read_stop_record(tmp_path)
    assert (record["reason"], record["step"], record["max_steps"]) == ("non_finite", 3, 20)
    with pytest.raises(UserError) as err:
        refuse_stopped(tmp_path, "pass --allow-stopped")
    assert str(err.value) == downstream_line(tmp_path, "grad_norm became nan at step 3",
                                             "pass --allow-stopped")
    (tmp_path / STOPPED_EARLY_JSON).write_text('{"summ')  # cut short: still a stopped run
    with pytest.raises(UserError, match="its stopped_early.json cannot be read"):
        refuse_stopped(tmp_path, "pass --allow-stopped")
    clear_stop_record(tmp_path)
    assert read_stop_record(tmp_path) is None


def test_merge_lora_refusal_is_lifted_by_the_environment(tmp_path, monkeypatch):
    from integrations.recipe_guard.stops import ALLOW_ENV, refuse_stopped_merge

    write_stop_record(tmp_path, reason="loss_watchdog", step=4, max_steps=20, summary="s",
                      fix="f and train again")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UserError, match=r"or set RECIPE_GUARD_ALLOW_STOPPED=1 to use it anyway"):
        refuse_stopped_merge({"output_dir": str(tmp_path)})
    monkeypatch.setenv(ALLOW_ENV, "1")
    refuse_stopped_merge({"output_dir": str(tmp_path)})
    # a recipe merging another adapter directory (lora_model_dir) is judged by that one
    monkeypatch.delenv(ALLOW_ENV)
    refuse_stopped_merge({"output_dir": str(tmp_path), "lora_model_dir": str(tmp_path / "x")})


def test_python_m_eval_and_export_check_before_anything_else(tmp_path, capsys):
    """A NaN stop leaves no adapter: the stop is what they report, not a missing file."""
    from eval.pipeline import main as eval_main
    from export.__main__ import main as export_main

    write_stop_record(tmp_path, reason="non_finite", step=3, max_steps=20,
                      summary="grad_norm became nan at step 3",
                      fix="lower learning_rate (or check the data) and train again")
    line = downstream_line(tmp_path, "grad_norm became nan at step 3", "pass --allow-stopped")
    assert eval_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"
    assert export_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"export: error: {line}\n"
    assert eval_main([str(tmp_path), "--allow-stopped"]) == 2  # then: no adapter there
    assert "adapter_config.json not found" in capsys.readouterr().err


def test_the_lines_are_in_the_bad_input_matrix_byte_for_byte():
    doc = (REPO / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    for command, line in lines_of(DOCUMENTED_LOSS, "…/out").items():
        assert f"`{line}`" in doc, (command, line)


def test_the_watchdog_it_reads_is_checked_like_a_patch_target():
    """Another Axolotl whose watchdog callback is gone or renamed its counters: one line naming
    the option to turn off, not a stop that silently goes unnoticed."""
    from types import SimpleNamespace

    from axolotl.utils.callbacks import LossWatchDogCallback

    from integrations.recipe_guard.stops import find_watchdog

    def trainer(*callbacks):
        return SimpleNamespace(callback_handler=SimpleNamespace(callbacks=list(callbacks)))

    dog = LossWatchDogCallback(SimpleNamespace(loss_watchdog_threshold=5.0,
                                               loss_watchdog_patience=3))
    assert find_watchdog(trainer(object(), dog)) is dog
    with pytest.raises(UserError, match=r"put no LossWatchDogCallback on the trainer, which "
                       r"`recipe_guard_stopped_run_fails` watches .*: pin axolotl==0\.19\.0 or "
                       r"set `recipe_guard_stopped_run_fails: false`"):
        find_watchdog(trainer(object()))
    del dog.violations
    with pytest.raises(UserError, match=r"LossWatchDogCallback of axolotl \S+ has no violations"):
        find_watchdog(trainer(dog))


def test_the_end_of_training_fails_after_a_stop_and_clears_an_old_record(tmp_path):
    from types import SimpleNamespace

    from integrations.recipe_guard.stops import finish

    write_stop_record(tmp_path, reason="loss_watchdog", step=4, max_steps=20, summary="s",
                      fix="f and train again")
    with pytest.raises(UserError, match="^the line$"):
        finish({"output_dir": str(tmp_path)}, SimpleNamespace(line="the line"))
    assert read_stop_record(tmp_path) is not None  # the stop's own record stays
    finish({"output_dir": str(tmp_path)}, SimpleNamespace(line=None))  # trained to the end
    assert read_stop_record(tmp_path) is None
