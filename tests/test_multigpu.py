"""The FSDP2 recipe: Axolotl accepts it, and the launch command in its header builds
the multi-process `accelerate launch` it promises. The throughput run itself needs 2+ GPUs
(bench/run_device_multi.sh; results in recipes/README.md)."""

from __future__ import annotations

import copy
import os
import shlex
import subprocess

import pytest
import yaml
from conftest import REPO, axolotl

RECIPE = REPO / "recipes" / "mistral-qlora-fsdp.yml"


def header_launch_command() -> list[str]:
    line = next(line for line in RECIPE.read_text().splitlines() if line.startswith("# Launch:"))
    return shlex.split(line.removeprefix("# Launch:").strip())


def test_fsdp_recipe_is_fsdp2_qlora_that_axolotl_validates_for_two_gpus(prepared_data,
                                                                          monkeypatch):
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = yaml.safe_load(RECIPE.read_text())
    single = yaml.safe_load((REPO / "recipes" / "mistral-qlora.yml").read_text())
    assert cfg["fsdp_version"] == 2
    assert cfg["bnb_config_kwargs"]["bnb_4bit_quant_storage"] == "bfloat16"
    assert cfg["fsdp_config"]["transformer_layer_cls_to_wrap"] == "MistralDecoderLayer"
    # same data and hyperparameters as the single-GPU recipe, apart from what sharding needs
    for key in ("datasets", "test_datasets", "sequence_len", "lora_r", "lora_alpha",
                "lora_target_linear", "learning_rate", "num_epochs", "micro_batch_size"):
        assert cfg[key] == single[key], key
    monkeypatch.setenv("WORLD_SIZE", "2")
    validated = validate_config(
        DictDefault(copy.deepcopy(cfg)),
        capabilities={"bf16": True, "fp8": True, "tf32": True, "n_gpu": 2,
                      "compute_capability": "sm_90"},
        env_capabilities={"torch_version": "2.11.0"})
    assert validated.fsdp_config.reshard_after_forward is True


def test_header_launch_command_builds_a_two_process_accelerate_launch(tmp_path, prepared_data):
    """Run the header's command through the real axolotl CLI, with `accelerate` replaced by a
    recorder on PATH, then parse what axolotl passed with accelerate's own argument parser."""
    from accelerate.commands.launch import launch_command_parser

    command = header_launch_command()
    assert command[:3] == ["axolotl", "train", "recipes/mistral-qlora-fsdp.yml"]
    record = tmp_path / "argv.txt"
    recorder = tmp_path / "bin" / "accelerate"
    recorder.parent.mkdir()
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n")
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{recorder.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(axolotl(*command[1:]), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    argv = record.read_text().splitlines()
    assert argv[0] == "launch"
    args = launch_command_parser().parse_args(argv[1:])
    assert args.num_processes == 2
    assert args.module and args.training_script == "axolotl.cli.train"
    assert args.training_script_args[0] == "recipes/mistral-qlora-fsdp.yml"


def test_real_launch_on_a_cpu_machine_stops_with_the_gpu_line(prepared_data):
    if __import__("torch").cuda.is_available():
        pytest.skip("on a GPU machine this would start training")
    command = header_launch_command()
    proc = subprocess.run(axolotl(*command[1:]), cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("needs an NVIDIA GPU" in e for e in errors), proc.stderr[-2000:]
