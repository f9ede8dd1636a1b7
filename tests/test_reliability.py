"""Reliability: what real users do to the pipeline.

- Resume: `axolotl train` of the tiny recipe is stopped with SIGTERM after checkpoint-5, re-run
  and stopped with SIGKILL after checkpoint-10, then checkpoint-10 is made to look like a kill
  while it was being saved (its trainer_state.json, which the Trainer writes last, removed), and
  the same command is run a third time. The result is compared loss for loss with the session's
  uninterrupted run (conftest's `tiny_trained`): same losses, learning rates and grad norms at
  every step, same final eval loss, same adapter and optimizer state. The resumed recipe saves
  every 5 steps (to have two checkpoints to kill after) and evaluates at step 20 only (the eval
  at 10 does not change training; an eval also runs at every (re)start), nothing else differs.
- Determinism: one more run of data_prep + `axolotl train` (fresh JSONL, fresh tokenisation)
  with the same seed gives bit-identical losses to the session run.
- Numerical safety: learning_rate 1e30 makes the gradients NaN at the first real update; the
  guard stops the run with one `error:` line, a non-zero exit, nothing saved.
- Disk full (RLIMIT_FSIZE in the child, SIGXFSZ ignored, so a write past the limit fails with
  EFBIG like a full disk fails with ENOSPC): data_prep, eval and the tiny-model builder fail
  with one line and leave earlier outputs byte-identical; an axolotl checkpoint save fails with
  one line and leaves a checkpoint that the next run skips.
- Secrets: fake HF_TOKEN/WANDB_API_KEY are in the environment of prep, training (fresh, killed,
  resumed) and eval; their values appear in no file those runs wrote and no output they printed.
- docs/bad-inputs.md names a real test for each row.

The real axolotl runs here cost about 4-5 min of CPU on 2 cores on top of the session run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FAKE_SECRETS, REPO, axolotl, book_csv_args, run_logged, write_recipe

from core.runs import newest_complete_checkpoint
from integrations.recipe_guard import main as guard_main

POLL_TIMEOUT_S = 900
ERROR_LINE = re.compile(r"^(?:[\w.]+: )?error: ")


def secret_env() -> dict[str, str]:
    return {**os.environ, **FAKE_SECRETS}


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def newest_state(output_dir: Path) -> dict:
    newest = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return state_of(newest)


def train_rows(state: dict) -> dict[int, dict]:
    """Training log rows by step; fails if a step was logged twice (data seen twice)."""
    rows = [r for r in state["log_history"] if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r for r in rows}


def eval_losses(state: dict) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in state["log_history"] if "eval_loss" in r}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR_LINE.match(line)]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def file_size_limit(limit_bytes: int):
    """preexec_fn: writes past `limit_bytes` fail with EFBIG (as a full disk fails with ENOSPC)
    instead of killing the process with SIGXFSZ."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def run_limited(cmd: list[str], limit_bytes: int, timeout: int = 600):
    return subprocess.run(cmd, cwd=REPO, env=secret_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=file_size_limit(limit_bytes))


# ----------------------------------------------------------------------------------------------
# Interrupting and resuming a real run


def launch(recipe: Path, log: Path) -> subprocess.Popen:
    """`axolotl train recipe` in its own process group (it starts accelerate, which starts
    python: a signal must reach all three, as Ctrl-C or a scheduler's kill would)."""
    with open(log, "w") as handle:
        return subprocess.Popen(axolotl("train", recipe), cwd=REPO, env=secret_env(),
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen, sig: int) -> int:
    try:
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=120)
    finally:
        # whatever survived the signal (nothing should) must not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint: Path, log: Path) -> None:
    """Until checkpoint/trainer_state.json is complete (written last by the Trainer)."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            state_of(checkpoint)
            return
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"axolotl exited ({proc.returncode}) before {checkpoint.name}:\n"
                        + log.read_text()[-3000:])
        time.sleep(0.2)
    stop_group(proc, signal.SIGKILL)
    pytest.fail(f"no {checkpoint} after {POLL_TIMEOUT_S} s:\n" + log.read_text()[-3000:])


@dataclass
class Interrupted:
    root: Path
    out: Path
    logs: list[Path]
    exit_codes: list[int]
    top_level_adapter_after_kill: list[bool]
    checkpoints_after_kill: list[list[str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def resume_chain(tiny_trained, tmp_path_factory) -> Interrupted:
    root = tmp_path_factory.mktemp("resume")
    out = root / "out"
    # the session's tokenised dataset is reused (read-only): only the training is under test
    recipe = write_recipe(tiny_trained.recipe, root / "tiny.yml", output_dir=str(out),
                          save_steps=5, eval_steps=20)
    result = Interrupted(root, out, [], [], [])
    for run, (kill_after, sig) in enumerate([(5, signal.SIGTERM), (10, signal.SIGKILL)]):
        log = root / f"run{run + 1}.log"
        proc = launch(recipe, log)
        wait_for_checkpoint(proc, out / f"checkpoint-{kill_after}", log)
        result.exit_codes.append(stop_group(proc, sig))
        result.logs.append(log)
        result.top_level_adapter_after_kill.append((out / "adapter_model.safetensors").exists())
        result.checkpoints_after_kill.append(sorted(p.name for p in out.glob("checkpoint-*")))
    # A kill while checkpoint-10 was being saved leaves it without trainer_state.json (the
    # Trainer writes the adapter, optimizer, scheduler and RNG state first).
    (out / "checkpoint-10" / "trainer_state.json").unlink()
    log = root / "run3.log"
    proc = launch(recipe, log)
    try:
        result.exit_codes.append(proc.wait(timeout=POLL_TIMEOUT_S))
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGKILL)
    result.logs.append(log)
    assert result.exit_codes[-1] == 0, log.read_text()[-4000:]
    return result


@pytest.mark.slow
def test_sigterm_and_sigkill_stop_the_run_without_a_final_adapter(resume_chain):
    assert resume_chain.exit_codes[:2] == [-signal.SIGTERM, -signal.SIGKILL]
    assert resume_chain.checkpoints_after_kill[0] == ["checkpoint-5"]
    assert "checkpoint-10" in resume_chain.checkpoints_after_kill[1]
    # nothing half-trained is left where the finished adapter goes
    assert resume_chain.top_level_adapter_after_kill == [False, False]


@pytest.mark.slow
def test_rerun_resumes_from_the_newest_complete_checkpoint(resume_chain):
    second, third = (log.read_text() for log in resume_chain.logs[1:])
    assert f"resume from checkpoint at {resume_chain.out / 'checkpoint-5'}" in second
    warnings = [line for line in third.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: checkpoint-10 in {resume_chain.out} has no complete trainer_state.json (the "
        "run was killed, or the disk filled, while saving it); resuming from checkpoint-5 "
        "instead"], warnings
    state = newest_state(resume_chain.out)
    assert state["global_step"] == 20
    assert sorted(train_rows(state)) == list(range(1, 21))  # each step once: none redone twice
    assert (resume_chain.out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_run_step_for_step(resume_chain, tiny_trained):
    """Same loss at every step after each resume point => same weights, optimizer and scheduler
    state, and the same batches (a repeated or skipped batch changes the loss at once)."""
    resumed = newest_state(resume_chain.out)
    reference = newest_state(tiny_trained.output_dir)
    got, want = train_rows(resumed), train_rows(reference)
    for step in range(1, 21):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-12), (
                step, key, got[step][key], want[step][key])
    assert eval_losses(resumed)[20] == pytest.approx(eval_losses(reference)[20], rel=1e-6)


@pytest.mark.slow
def test_resumed_adapter_and_optimizer_state_equal_the_uninterrupted_ones(resume_chain,
                                                                          tiny_trained):
    import torch
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "checkpoint-20/adapter_model.safetensors"):
        got = load_file(resume_chain.out / name)
        want = load_file(tiny_trained.output_dir / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    got = torch.load(resume_chain.out / "checkpoint-20/optimizer.pt", weights_only=True)
    want = torch.load(tiny_trained.output_dir / "checkpoint-20/optimizer.pt", weights_only=True)
    assert got["state"].keys() == want["state"].keys()
    for index, moments in want["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(got["state"][index][key], value, rtol=1e-6, atol=1e-9)


def test_incomplete_newest_checkpoint_is_skipped(tmp_path):
    for step, state in ((5, {"global_step": 5}), (10, None), (15, "{truncated")):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        if state is not None:
            (checkpoint / "trainer_state.json").write_text(
                state if isinstance(state, str) else json.dumps(state))
    (tmp_path / "checkpoint-final").mkdir()  # not a step number: ignored, as Axolotl does
    complete, incomplete = newest_complete_checkpoint(tmp_path)
    assert complete == tmp_path / "checkpoint-5"
    assert incomplete == [tmp_path / "checkpoint-10", tmp_path / "checkpoint-15"]
    assert newest_complete_checkpoint(tmp_path / "nothing") == (None, [])


# ----------------------------------------------------------------------------------------------
# Determinism: prep + training again with the same seed


@dataclass
class SecondRun:
    root: Path
    prepared: Path
    out: Path
    prep_rc: int
    train_rc: int
    train_log: Path


@pytest.fixture(scope="module")
def second_run(tiny_trained, tmp_path_factory) -> SecondRun:
    root = tmp_path_factory.mktemp("second-run")
    prepared = root / "prepared"
    prep = run_logged([sys.executable, "-m", "data_prep", "--mode", "clean", *book_csv_args(),
                       "--out", str(prepared)], root / "prep.log",
                      env=secret_env())
    data = prepared / "clean"
    recipe = write_recipe(
        tiny_trained.recipe, root / "tiny.yml", output_dir=str(root / "out"),
        dataset_prepared_path=str(root / "axolotl-prepared"),  # tokenised and packed afresh
        datasets=[{"path": str(data / "train.jsonl"), "ds_type": "json", "type": "completion"}],
        test_datasets=[{"path": str(data / "eval.jsonl"), "ds_type": "json",
                        "type": "completion", "split": "train"}],
    )
    train = run_logged(axolotl("train", recipe), root / "train.log", env=secret_env())
    return SecondRun(root, prepared, root / "out", prep.returncode, train.returncode,
                     root / "train.log")


@pytest.mark.slow
def test_same_seed_gives_identical_prep_and_identical_losses(second_run, tiny_trained):
    assert second_run.prep_rc == 0, (second_run.root / "prep.log").read_text()[-3000:]
    assert second_run.train_rc == 0, second_run.train_log.read_text()[-4000:]
    assert tree_digest(second_run.prepared / "clean") == tree_digest(
        REPO / "data" / "prepared" / "clean")
    again, reference = newest_state(second_run.out), newest_state(tiny_trained.output_dir)
    got, want = train_rows(again), train_rows(reference)
    assert sorted(got) == sorted(want) == list(range(1, 21))
    # bit-identical on the same machine: CPU kernels with a fixed thread count are
    # deterministic once the LoRA init and the packed order are seeded (integrations/recipe_guard)
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in want]
    assert [got[s]["grad_norm"] for s in got] == [want[s]["grad_norm"] for s in want]
    assert eval_losses(again) == eval_losses(reference)


# ----------------------------------------------------------------------------------------------
# Numerical safety


@pytest.mark.slow
def test_exploding_learning_rate_stops_with_one_line_and_saves_nothing(tiny_trained, tmp_path):
    """With AdamW the first real update moves every trained weight by about the learning rate:
    at 1e30 the next forward/backward overflows and the gradient norm is NaN (measured: step 3;
    step 1 has learning rate 0 in warm-up). Without the guard the run would go on and save."""
    out = tmp_path / "out"
    recipe = write_recipe(tiny_trained.recipe, tmp_path / "nan.yml", output_dir=str(out),
                          learning_rate=1.0e30, eval_steps=None)
    proc = subprocess.run(axolotl("train", recipe), cwd=REPO, env=secret_env(),
                          capture_output=True, text=True, timeout=POLL_TIMEOUT_S)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    match = re.match(r"error: (loss|grad_norm) became (nan|inf|-inf) at step (\d+); training "
                     r"stopped before saving\. Lower learning_rate", errors[0])
    assert match, errors[0]
    assert 2 <= int(match[3]) <= 5, errors[0]  # at the blow-up, not before any update
    logged = re.findall(r"'loss': '([^']+)'", proc.stdout + proc.stderr)
    assert len(logged) >= 2 and all(math.isfinite(float(v)) for v in logged), logged
    assert "site-packages/transformers" not in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()
    assert not list(out.glob("checkpoint-*"))
    # the run directory records the stop, so eval/merge-lora/export say so (test_watchdog_stop)
    record = json.loads((out / "stopped_early.json").read_text())
    assert record["reason"] == "non_finite" and record["step"] == int(match[3])
    assert record["summary"] == f"{match[1]} became {match[2]} at step {match[3]}"


# ----------------------------------------------------------------------------------------------
# Disk full while writing


def assert_one_error_line(proc, must_contain: list[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    for fragment in must_contain:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    return errors[0]


@pytest.mark.parametrize("what", ["disk full", "output path is a file"])
def test_data_prep_write_failure_is_one_line_and_keeps_earlier_outputs(what, tmp_path,
                                                                       prepared_data):
    out = tmp_path / "prepared"
    shutil.copytree(prepared_data / "clean", out / "clean")
    before = tree_digest(out)
    # another seed: the outputs must change
    cmd = [sys.executable, "-m", "data_prep", "--mode", "clean", *book_csv_args(), "--seed", "7"]
    if what == "disk full":  # train.jsonl is about 370 kB
        proc = run_limited([*cmd, "--out", str(out)], limit_bytes=100_000)
        reason = "File too large"
    else:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where the output directory should be\n")
        proc = run_limited([*cmd, "--out", str(blocker)], limit_bytes=10**9)
        reason = "File exists"
    target = out / "clean" if what == "disk full" else blocker / "clean"
    assert_one_error_line(proc, [f"data_prep: error: {target}: cannot write the outputs "
                                 f"({reason})", "free disk space"])
    assert tree_digest(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["clean"]  # no staging directory left


@pytest.mark.parametrize("what", ["disk full", "output path is a file"])
def test_eval_write_failure_is_one_line_and_keeps_earlier_outputs(what, tmp_path, tiny_model):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "perplexity.json").write_text('{"earlier": "result"}\n')
    before = tree_digest(out)
    data = REPO / "data" / "prepared" / "clean" / "eval.jsonl"
    target = out if what == "disk full" else out / "perplexity.json"  # a file, not a dir
    proc = run_limited([sys.executable, "-m", "eval.perplexity", "--model", str(tiny_model),
                        "--data", str(data), "--max-rows", "2", "--no-progress", "--out",
                        str(target)], limit_bytes=1000 if what == "disk full" else 10**9)
    reason = "File too large" if what == "disk full" else "File exists"
    assert_one_error_line(proc, [f"error: cannot write the outputs in {target} ({reason})",
                                 "free disk space"])
    assert tree_digest(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["perplexity.json"]  # no temp file left


def test_tiny_model_build_on_a_full_disk_is_one_line_and_keeps_the_earlier_build(tmp_path):
    from models.tiny_mistral import build_tiny_mistral

    built = build_tiny_mistral(tmp_path / "tiny", seed=0)
    before = tree_digest(built)
    proc = run_limited([sys.executable, "-m", "models.tiny_mistral", "--out", str(built),
                        "--seed", "1", "--force"], limit_bytes=1_000_000)  # weights ~17 MB
    assert_one_error_line(proc, [f"models.tiny_mistral: error: cannot write {built} (",
                                 "File too large", "free disk space"])
    assert tree_digest(built) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging directory left


@pytest.mark.slow
def test_axolotl_checkpoint_save_on_a_full_disk(tiny_trained, tmp_path):
    """Axolotl's own save: the guard turns the failure into one line; the half-written
    checkpoint has no trainer_state.json, so the next run would resume from before it."""
    out = tmp_path / "out"
    recipe = write_recipe(tiny_trained.recipe, tmp_path / "full.yml", output_dir=str(out),
                          save_steps=1, max_steps=3, eval_steps=None)
    # 5 MB: room for the tokenizer files written at start (3.5 MB), not for the checkpoint's
    # adapter (8 MB: LoRA + the trained copy of lm_head)
    proc = run_limited(axolotl("train", recipe), limit_bytes=5_000_000,
                       timeout=POLL_TIMEOUT_S)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert errors == [
        f"error: saving checkpoint-1 in {out} failed (Error while serializing: I/O error: File "
        "too large (os error 27)); if the disk is full, free space and re-run the same "
        "command: it resumes from the newest complete checkpoint"], proc.stderr[-3000:]
    for library in ("transformers", "peft", "safetensors"):
        assert f"site-packages/{library}" not in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()
    assert newest_complete_checkpoint(out) == (None, [out / "checkpoint-1"])


# ----------------------------------------------------------------------------------------------
# Secrets


def find_secrets(paths: list[Path], secrets: dict[str, str]) -> list[tuple[str, str]]:
    """(file, secret name) for every file under `paths` holding a secret value, as UTF-8 bytes
    or UTF-16 (binary-safe: every file is read as bytes, whatever its type)."""
    needles = {name: (value.encode(), value.encode("utf-16-le"))
               for name, value in secrets.items()}
    found = []
    for base in paths:
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for path in files:
            if path.is_symlink():
                continue
            data = path.read_bytes()
            found += [(str(path), name) for name, forms in needles.items()
                      if any(form in data for form in forms)]
    return found


def test_secret_scanner_finds_a_planted_value(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    blob = os.urandom(2_000_000) + FAKE_SECRETS["HF_TOKEN"].encode() + os.urandom(100)
    (tmp_path / "deep" / "er" / "weights.bin").write_bytes(blob)
    (tmp_path / "log.txt").write_text("token=" + FAKE_SECRETS["WANDB_API_KEY"],
                                      encoding="utf-16-le")
    (tmp_path / "clean.txt").write_text("nothing here")
    assert sorted(find_secrets([tmp_path], FAKE_SECRETS)) == [
        (str(tmp_path / "deep" / "er" / "weights.bin"), "HF_TOKEN"),
        (str(tmp_path / "log.txt"), "WANDB_API_KEY"),
    ]


@pytest.mark.slow
def test_fake_secrets_appear_in_no_output_or_log(tiny_trained, second_run, resume_chain,
                                                 tmp_path):
    """Prep (second_run), training (session run, second run, killed and resumed runs) and eval
    (below) all ran with FAKE_SECRETS in their environment."""
    run_dir = second_run.out
    eval_dir = tmp_path / "eval"
    commands = {
        "perplexity": [sys.executable, "-m", "eval.perplexity", "--adapter", str(run_dir),
                       "--compare", "--max-rows", "3", "--no-progress", "--out", str(eval_dir)],
        "generate": [sys.executable, "-m", "eval.generate", "--adapter", str(run_dir),
                     "--prompt", "It was on a dreary night", "--max-new-tokens", "8",
                     "--samples", "1", "--out", str(eval_dir)],
        "report": [sys.executable, "-m", "eval.report", str(run_dir), "--perplexity",
                   str(eval_dir / "perplexity.json"), "--generations",
                   str(eval_dir / "generations.json")],
    }
    for name, cmd in commands.items():
        proc = run_logged(cmd, tmp_path / f"{name}.log", env=secret_env())
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert (run_dir / "report.md").is_file() and (eval_dir / "generations.json").is_file()

    scanned = [tmp_path, tiny_trained.output_dir.parent, second_run.root, resume_chain.root]
    n_files = sum(1 for base in scanned for p in base.rglob("*") if p.is_file())
    assert n_files > 50  # logs, recipes, prepared data, checkpoints, adapters, eval outputs
    assert find_secrets(scanned, FAKE_SECRETS) == []


# ----------------------------------------------------------------------------------------------
# The bad-input matrix


def test_recipe_that_is_not_valid_yaml_is_one_line_from_the_guard(tmp_path, capsys):
    """`axolotl train` parses the YAML before any plugin loads (so it shows yaml's traceback);
    `python -m integrations.recipe_guard RECIPE` names the line."""
    broken = tmp_path / "broken.yml"
    broken.write_text("base_model: ./models/tiny-mistral\n  adapter: lora\n")
    assert guard_main([str(broken), str(tmp_path / "missing.yml")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {broken}: not valid YAML at line 2; fix the indentation/quoting there",
        f"error: {tmp_path / 'missing.yml'}: recipe file not found"]


def test_every_row_of_the_bad_input_matrix_names_an_existing_test():
    text = (REPO / "docs" / "bad-inputs.md").read_text()
    rows = [line for line in text.splitlines()
            if line.startswith("|") and not re.match(r"\|\s*(-|Bad input)", line)]
    assert len(rows) >= 25
    for row in rows:
        refs = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)(?:\[[^\]]*\])?`", row)
        assert refs, f"row without a backing test: {row}"
        for file, name in refs:
            source = (REPO / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
