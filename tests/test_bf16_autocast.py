"""integrations.bf16_autocast: when it turns bf16 autocast on, and a real `axolotl train` under it
(the tiny recipe with `bf16_autocast: true`, on any CPU) against the fp32 run of the same recipe."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, axolotl, write_recipe

from integrations.bf16_autocast.plugin import (
    NAME,
    cpu_bf16_instructions,
    decide,
    settings_problems,
)

PLUGINS = ["integrations.recipe_guard.RecipeGuardPlugin",
           "integrations.bf16_autocast.Bf16AutocastPlugin"]


@pytest.mark.parametrize(("value", "half", "cuda", "cuda_bf16", "cpu", "expected"), [
    ("auto", None, False, False, "AVX512-BF16", {"bf16": True, "use_cpu": True}),
    ("auto", None, False, False, "AMX", {"bf16": True, "use_cpu": True}),
    ("auto", None, False, False, None, {}),  # emulated bf16 is slower than fp32: stay fp32
    (True, None, False, False, None, {"bf16": True, "use_cpu": True}),
    (False, None, False, False, "AVX512-BF16", {}),
    ("auto", None, True, True, None, {"bf16": True}),  # autocast on the GPU, no use_cpu
    ("auto", None, True, False, None, {}),  # a GPU older than Ampere
    ("auto", "bf16", True, True, None, {}),  # the recipe chose its own precision
    ("auto", "fp16", False, False, "AMX", {}),
])
def test_decision_follows_the_option_the_recipe_and_the_hardware(value, half, cuda, cuda_bf16,
                                                                 cpu, expected):
    decision = decide(value, half, cuda, cuda_bf16, cpu)
    assert decision.training_args() == expected
    assert decision.line().startswith("bf16_autocast: training in "
                                      + ("bf16 autocast" if expected else "fp32"))


def test_conflicting_or_unknown_settings_are_one_line_each():
    assert settings_problems({"bf16_autocast": "auto", "bf16": False}) == []
    [line] = settings_problems({"bf16_autocast": True, "bf16": True})
    assert "`bf16: true`" in line and "remove one" in line
    [line] = settings_problems({"bf16_autocast": "yes"})
    assert "'yes' is not one of auto, true, false" in line


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or not Path("/proc/cpuinfo").is_file(), reason="x86-64 Linux only")
def test_cpu_detection_agrees_with_the_kernels_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    native = {"amx_bf16", "avx512_bf16"} & flags
    assert (cpu_bf16_instructions() is not None) == bool(native), (native,
                                                                   cpu_bf16_instructions())


AUTOCAST_STEPS = 8


def first_losses(output_dir: Path) -> list[float]:
    newest = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return [row["loss"] for row in history if "loss" in row]


def test_axolotl_trains_the_tiny_recipe_under_bf16_autocast(tiny_trained, tmp_path):
    """The same recipe, seed and data as the fp32 session run, with the plugin forced on: the
    Trainer ran with bf16 on the CPU, the first loss (LoRA B = 0: the base model's forward pass)
    differs from fp32 by bf16 rounding only, the loss fell, and the adapter is saved in fp32.
    AUTOCAST_STEPS of the fp32 run's steps: on a CPU without bf16 instructions each step is
    emulated and takes several times the fp32 step."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU path is what is tested here")
    out = tmp_path / "out"
    recipe = write_recipe(tiny_trained.recipe, tmp_path / "tiny-autocast.yml", plugins=PLUGINS,
                          bf16_autocast=True, output_dir=str(out),
                          max_steps=AUTOCAST_STEPS, save_steps=AUTOCAST_STEPS,
                          dataset_prepared_path=str(tiny_trained.output_dir.parent / "prepared"))
    proc = subprocess.run(axolotl("train", recipe), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bf16_autocast: training in bf16 autocast (fp32 weights)" in proc.stderr

    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    args = torch.load(newest / "training_args.bin", weights_only=False)
    assert args.bf16 and args.use_cpu

    fp32, autocast = first_losses(tiny_trained.output_dir), first_losses(out)
    assert len(autocast) == AUTOCAST_STEPS and len(fp32) == 20
    assert autocast[0] != fp32[0]  # bf16 matrix products really ran
    assert abs(autocast[0] - fp32[0]) < 0.01 * fp32[0], (autocast[0], fp32[0])
    assert sum(autocast[-3:]) / 3 < autocast[0] - 1.0, autocast

    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
        dtypes = {weights.get_tensor(name).dtype for name in names}
    assert dtypes == {torch.float32}


@pytest.mark.parametrize(("plugins", "overrides", "says"), [
    # the plugin alone: its own conflict check
    (PLUGINS[1:], {"bf16_autocast": True, "bf16": True}, [NAME, "remove one"]),
    # as the recipes list it, behind the guard: on a CPU the guard's GPU check speaks first and
    # points at the plugin
    (PLUGINS, {"bf16_autocast": True, "bf16": True},
     ["needs an NVIDIA GPU (bf16)", "set `bf16: false`", "Bf16AutocastPlugin"]),
    (PLUGINS, {"bf16_autocast": "maybe"},
     ["`bf16_autocast`: Input should be 'auto', True or False (got 'maybe')"]),
])
def test_bad_settings_stop_axolotl_train_in_one_line(plugins, overrides, says, tiny_model,
                                                     tmp_path):
    if torch.cuda.is_available() and "bf16" in overrides:
        pytest.skip("this machine has CUDA")
    recipe = write_recipe(REPO / "recipes" / "tiny-mistral-cpu.yml", tmp_path / "r.yml",
                          plugins=plugins, output_dir=str(tmp_path / "out"), **overrides)
    proc = subprocess.run(axolotl("train", recipe), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert all(part in errors[0] for part in says), errors[0]
    assert "site-packages/axolotl" not in proc.stderr
