"""gpu_check (python -m gpu_check): the GPU owner's one command, run for real on the CPU with the tiny model.

The slow test runs the whole orchestration with real subprocesses: data_prep, `axolotl train`
killed with SIGTERM after its first checkpoint and run again (it must resume and finish), the
uninterrupted reference run beside it, `python -m eval`, `axolotl merge-lora`, the merged model
against base + adapter, and pytest, then reads the summary it wrote. On a CPU the resumed run
must equal the uninterrupted one exactly, and the merged model base + adapter. Evaluation during
training is turned off (--set) to keep it to a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, book_csv_args
from test_eval_errors import HUB_ANSWERS, FakeHub

from gpu_check.check import STAGES
from gpu_check.figures import gpu_slug, junit_counts
from gpu_check.summary import render_summary


@pytest.mark.slow
def test_gpu_check_runs_the_whole_user_path_on_the_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gpu_check", "--recipe", "recipes/tiny-mistral-cpu.yml",
           "--model", str(tiny_model), "--work", str(tmp_path / "work"), "--out", str(out),
           "--launcher", "python",  # as on a GPU box whose packages have no commands
           "--set", "max_steps=4", "--set", "save_steps=2", "--set", "eval_steps=null",
           "--set", "eval_strategy='no'", "--prep-args", " ".join(book_csv_args()),
           "--eval-args", "--max-new-tokens 8 --max-rows 4 --no-control",
           "--pytest-args", "tests/test_eval_generate.py -k trailing_space"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    summary_file = out / "summary.json"
    assert summary_file.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    logs = (out / "logs.txt").read_text()
    assert list(stages) == list(STAGES)
    assert all(s["status"] == "ok" for s in stages.values()), (
        {n: (s["status"], s["note"]) for n, s in stages.items()}, logs[-5000:])
    assert proc.returncode == 0 and summary["ok"]

    # killed right after its first checkpoint, then resumed from exactly that one and finished
    killed = stages["train_interrupted"]
    assert killed["key"]["checkpoint"] == "checkpoint-2" and killed["key"]["exit"] != 0
    resumed = stages["train_resumed"]["key"]
    assert resumed["resumed_from_step"] == 2
    assert resumed["global_step"] == resumed["max_steps"] == 4
    assert stages["train_resumed"]["command"] == killed["command"]  # the very same command
    assert " -m axolotl.cli.train " in killed["command"]
    # on a CPU the resumed run is the uninterrupted one, bit for bit
    comparison = summary["resume_vs_uninterrupted"]
    assert comparison["steps_compared"] == 4
    assert comparison["loss_max_abs_diff"] == pytest.approx(0, abs=1e-6)
    assert comparison["adapter_max_abs_diff"] == pytest.approx(0, abs=1e-6)

    # the uninterrupted run is timed part by part (bench.timeline), as bench.time_to_adapter does
    waited = stages["train_reference"]["key"]["time_to_adapter"]
    assert waited["steps"] == 4 and waited["checkpoints"] == 2
    assert sum(waited["parts"].values()) == pytest.approx(waited["time_to_adapter_s"], abs=0.01)
    assert "time to adapter" in (out / "summary.md").read_text()

    evaluate = stages["evaluate"]["key"]
    assert evaluate["generated_tokens_per_s"] > 0 and evaluate["load_s"] > 0
    assert evaluate["held_out_ppl_adapter"] < evaluate["held_out_ppl_base"]
    merged = stages["merged_logits"]["key"]
    assert merged["ok"] and merged["nll_rel_diff_pct"] < 1e-3 and merged["top1_agreement"] == 1
    weights = merged["weights"]  # every LoRA layer of the tiny model: 2 layers x 7 targets
    assert weights["ok"] and weights["layers"] == 14 and not weights["missing"]
    assert merged["loss_gain_kept"] == pytest.approx(1, abs=1e-3)
    assert merged["adapter_effect_max_abs"] > 100 * merged["max_abs_logit_diff"]
    assert stages["merge"]["key"]["size_gb"] > 0
    assert stages["pytest"]["key"]["passed"] == 1 and stages["pytest"]["key"]["failures"] == 0
    assert summary["model"]["kind"] == "given" and summary["machine"]["gpus"] == []

    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check: all stages ok")
    for stage in stages.values():
        assert f"| {stage['title']} | ok |" in md
    assert "## Resumed vs uninterrupted" in md and "## Evaluation time" in md
    assert (out / "generations.md").is_file() and (out / "perplexity.md").is_file()
    assert "===== train_interrupted" in logs


def test_without_a_usable_hub_token_the_random_init_model_is_built_and_said(tmp_path):
    """HF_TOKEN set, but the (local stand-in) hub refuses the gated model: the check says why
    in one line and builds the random-init model of the same shape (tiny here: no GPU)."""
    out = tmp_path / "out"
    with FakeHub(HUB_ANSWERS["gated, no access"]) as hub:
        env = {**os.environ, "HF_TOKEN": "hf_FAKEtokenForTheLocalStandInHub0123",
               "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
               "HF_HOME": str(tmp_path / "hf-home")}
        skip = ",".join(s for s in STAGES if s != "model")
        proc = subprocess.run(
            [sys.executable, "-m", "gpu_check", "--skip", skip, "--work",
             str(tmp_path / "work"), "--random-model-dir", str(tmp_path / "random"),
             "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    model = summary["model"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert model["kind"] == "random-init" and model["ref"] == str(tmp_path / "random")
    assert model["note"].startswith("HF_TOKEN is set but the hub refused: model "
                                    "mistralai/Mistral-7B-v0.1 is gated")
    assert (tmp_path / "random" / "config.json").is_file()
    assert "hf_FAKE" not in (out / "summary.json").read_text() + (out / "summary.md").read_text()
    assert "**random-init**" in (out / "summary.md").read_text()


def test_summary_helpers():
    assert gpu_slug([]) == "cpu"
    assert gpu_slug([{"name": "NVIDIA H200"}]) == "nvidia-h200"
    assert gpu_slug([{"name": "NVIDIA H200"}] * 2) == "2x-nvidia-h200"


def test_pytest_counts_come_from_its_junit_report(tmp_path):
    tests = tmp_path / "test_tiny.py"
    tests.write_text("import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 0\n"
                     "\n@pytest.mark.skip\ndef test_skipped():\n    pass\n")
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", "--rootdir", str(tmp_path), "-c", os.devnull],
                   cwd=tmp_path, capture_output=True, timeout=120)
    counts = junit_counts(junit)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == (
        3, 1, 1, 1)
    assert counts["failed_tests"] == ["test_tiny::test_bad"]


def test_render_summary_of_a_failed_stage():
    stage = {"name": "merge", "title": "merge-lora", "status": "failed", "note": "exit 1: boom",
             "wall_s": 3.0, "peak_gpu_mib": None, "gpu_used_peak_mib": 2048, "key": {},
             "command": "axolotl merge-lora r.yml", "log": None}
    summary = {"ok": False, "date": "2026-11-30", "wall_s": 10.0, "recipe": "r.yml",
               "overrides": {}, "model": {"kind": "random-init", "ref": "m", "note": "n"},
               "machine": {"gpus": [{"index": "0", "name": "NVIDIA H200", "memory_mib": 143771,
                                     "driver": "580"}], "python": "3.12", "packages": {},
                           "cpus": 16, "commit": None},
               "lanes": {"a": "0", "b": "0"}, "stages": [stage, {**stage, "name": "evaluate",
                                                                 "status": "skipped"}],
               "resume_vs_uninterrupted": None, "goals": {"generate_s": 20, "evaluate_s": 90}}
    md = render_summary(summary)
    assert md.startswith("# GPU check: FAILED")
    assert "| merge-lora | failed: exit 1: boom | 3 s | 2.0 GiB (whole GPU) |" in md


def test_merged_weight_check_tells_a_wrong_merge_from_rounding(tiny_model, tmp_path):
    """The merged-model stage's weight check on a real peft model of the tiny Mistral: a merge
    stored in bf16 passes (rounding only), one with a layer's LoRA change left out or doubled
    fails, naming that layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from gpu_check.compare_merged import merged_weight_check

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer zero
            torch.nn.init.normal_(param, std=0.05)

    def stored(bad_layer=None, factor=1.0) -> dict:
        tensors = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A"):
                key = name.split("base_model.model.", 1)[-1] + ".weight"
                delta = module.scaling["default"] * (module.lora_B["default"].weight
                                                     @ module.lora_A["default"].weight)
                scale = factor if key == bad_layer else 1.0
                tensors[key] = (module.base_layer.weight + scale * delta).detach().bfloat16()
        return tensors

    right = stored()
    assert len(right) == 14
    save_file(right, tmp_path / "model.safetensors")
    check = merged_weight_check(model, tmp_path)
    assert check["ok"] and check["layers"] == 14 and check["stored_dtype"] == "bfloat16"
    assert check["worst"]["error_mean_abs"] > 0  # bf16 rounding is there, and allowed

    bad = "model.layers.1.mlp.down_proj.weight"
    for factor in (0.0, 2.0):
        save_file(stored(bad, factor), tmp_path / "model.safetensors")
        check = merged_weight_check(model, tmp_path)
        assert not check["ok"] and check["layers_over_rounding"] == [bad], factor


# ----------------------------------------------------------------------------------------------
# Why a stage ended early, and a given model that is not pretrained


@pytest.mark.parametrize(("log", "rc", "why"), [
    ("[WARNING] [axolotl.utils.callbacks] Loss is too high, stopping training "
     "(loss_watchdog_threshold)\nerror: the loss stayed above loss_watchdog_threshold 5.0 for 3 "
     "steps in a row, 10.3700 at step 3, so Axolotl's loss watchdog stopped training at step 4 "
     "of 20; ...", 1, "stopped by the loss watchdog at step 4"),
    ("[WARNING] Loss is too high, stopping training (loss_watchdog_threshold)\nTraining "
     "completed!", 0, "stopped by the loss watchdog"),  # the guard's option off: exit 0
    ("error: grad_norm became nan at step 3; training stopped before saving.", 1,
     "NaN/inf stop at step 3"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1,
     "out of GPU memory"),
    ("error: saving checkpoint-10 in out failed (No space left on device); ...", 1, "disk full"),
    ("E1204 ... failed (exitcode: -9) local_rank: 0 (pid: 123) of binary: python", -9,
     "killed (SIGKILL, out of host memory?)"),
    ("Killed\n", 137, "killed (SIGKILL, out of host memory?)"),
    ("step 5 done\n", -15, "killed (SIGTERM)"),
    ("Traceback ...\nValueError: something else\n", 1, ""),
])
def test_a_stage_says_why_it_ended_early(log, rc, why, tmp_path):
    from gpu_check.logs import early_end_reason

    path = tmp_path / "stage.log"
    path.write_text(log)
    assert early_end_reason(path, rc) == why


def pretrained_copy(model_dir, target, dtype=None):
    """The model with one norm weight moved off 1.0, as training moves them (and in `dtype`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, target)
    weights = load_file(str(target / "model.safetensors"))
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    key = next(k for k in weights if k.endswith("norm.weight"))
    weights[key] = weights[key].clone()
    weights[key][0] = 1.25
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_model_whose_norms_are_as_initialised_is_not_pretrained(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from gpu_check.model import untrained_reason

    assert untrained_reason(tiny_model) == "all 5 norm weights are 1.0, as initialised"
    assert untrained_reason(pretrained_copy(tiny_model, tmp_path / "trained")) is None
    bf16 = tmp_path / "bf16"  # the random 7B is saved in bf16
    bf16.mkdir()
    weights = {k: v.to(torch.bfloat16) for k, v in
               load_file(str(tiny_model / "model.safetensors")).items()}
    save_file(weights, str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    assert untrained_reason(bf16) == "all 5 norm weights are 1.0, as initialised"
    assert untrained_reason(pretrained_copy(tiny_model, tmp_path / "t16", torch.bfloat16)) is None
    assert untrained_reason(tmp_path / "empty") is None  # no weights to judge: left as given


def test_a_given_random_init_model_is_trained_without_the_watchdog_as_a_built_one(tiny_model,
                                                                                  tmp_path):
    """`--model DIR` of a random-init model with a recipe whose watchdog (threshold 5.0) is set
    for real weights: the watchdog would stop it after 3 steps, so it is dropped, as for the
    model gpu-check builds, and the summary says why; a pretrained one keeps it."""
    from core.runs import load_recipe
    from gpu_check.check import Check
    from gpu_check.cli import parse_args

    def run_recipe(model):
        check = Check(parse_args(["--recipe", "recipes/mistral-qlora.yml", "--model", str(model),
                                  "--work", str(tmp_path / model.name), "--skip", "pytest"]))
        check.prepare_work()
        check.model()
        return check, load_recipe(check.write_recipe("run"))

    check, cfg = run_recipe(tiny_model)
    assert check.model_kind == "given"
    assert "loss_watchdog_threshold" not in cfg and "loss_watchdog_patience" not in cfg
    assert check.stages["model"].note == (
        f"--model {tiny_model}; not pretrained (all 5 norm weights are 1.0, as initialised): "
        "trained without the recipe's loss watchdog, as a random-init model is")
    check, cfg = run_recipe(pretrained_copy(tiny_model, tmp_path / "pretrained"))
    assert (cfg["loss_watchdog_threshold"], cfg["loss_watchdog_patience"]) == (5.0, 3)
    assert check.model_untrained is None
