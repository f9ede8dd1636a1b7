"""Recipes: Axolotl's own validator accepts every recipe offline, our guard rejects typos and bad
types clearly, and the tiny recipe trains, evaluates and merges for real (shared tiny run)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, axolotl, run_logged, write_recipe

from integrations.recipe_guard import check_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yml"))
H100_CAPABILITIES = {"bf16": True, "fp8": True, "tf32": True, "n_gpu": 1,
                     "compute_capability": "sm_90"}
CPU_CAPABILITIES = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1,
                    "compute_capability": None}
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def model_config_dirs(tmp_path_factory) -> dict[str, Path]:
    """config.json-only directories standing in for each recipe's base model (no weights needed:
    validation reads the architecture, never the weights)."""
    from transformers import LlamaConfig

    from models.tiny_mistral import TINY_SHAPE, mistral_config

    root = tmp_path_factory.mktemp("model-configs")
    configs = {
        "mistralai/Mistral-7B-v0.1": mistral_config(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, sliding_window=4096,
            max_position_embeddings=32768),
        "./models/tiny-mistral": mistral_config(**TINY_SHAPE),
        # SmolLM2-135M's architecture
        "./models/smollm2-135m": LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    }
    dirs = {}
    for name, config in configs.items():
        config.save_pretrained(root / name.strip("./").replace("/", "--"))
        dirs[name] = root / name.strip("./").replace("/", "--")
    return dirs


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_passes_axolotl_validation_offline(recipe, model_config_dirs, prepared_data):
    from axolotl.utils.config import normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = load(recipe)
    assert check_recipe(
        {**cfg, "base_model": str(model_config_dirs[cfg["base_model"]])}
    ) == []
    gpu_recipe = cfg.get("load_in_4bit") or cfg.get("bf16") is True
    validated = validate_config(
        DictDefault(copy.deepcopy(cfg)),
        capabilities=H100_CAPABILITIES if gpu_recipe else CPU_CAPABILITIES,
        env_capabilities={"torch_version": "2.13.0"},
    )
    validated.base_model_config = str(model_config_dirs[cfg["base_model"]])
    normalize_config(validated)
    assert validated.sequence_len == cfg["sequence_len"]
    assert validated.output_dir == f"./outputs/{recipe.stem}"


def test_every_demo_calibration_and_sweep_variant_passes_axolotl_validation(model_config_dirs,
                                                                          prepared_data):
    """The demo's calibration variants (demo.calibrate) and GPU sweep variants
    (demo.sweep) are the demo recipe with overrides: each, rebuilt on the recipe as it is
    now, still passes our guard and Axolotl's schema, with the adapter targets it names."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    from core.runs import merge_config
    from demo.calibrate import RECIPE, VARIANTS
    from demo.sweep import SWEEP

    base = load(RECIPE)
    problems = []
    for name, overrides in [*VARIANTS.items(), *SWEEP.items()]:
        # rows were recorded against the recipe of their day: a variant that left these to the
        # recipe would rebuild a different run now
        assert {"lora_target_linear", "sequence_len"} <= overrides.keys(), name
        cfg = merge_config(base, overrides)
        model_dir = str(model_config_dirs[cfg["base_model"]])
        problems += [f"{name}: {p}" for p in check_recipe({**cfg, "base_model": model_dir})]
        validated = validate_config(DictDefault(copy.deepcopy(cfg)),
                                    capabilities=CPU_CAPABILITIES,
                                    env_capabilities={"torch_version": "2.13.0"})
        targets = set(validated.lora_target_modules or [])
        assert bool(validated.lora_target_linear) == (not targets), name
        assert targets in (set(), {"gate_proj", "up_proj", "down_proj"},
                           {"q_proj", "k_proj", "v_proj", "o_proj"}), name
    assert problems == []


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_header_and_groups(recipe):
    text = recipe.read_text()
    header = text.split("\n\n")[0]
    for field in ("What:", "Data:", "Hardware:", "Launch:", "Measured:"):
        assert field in header, f"{recipe.name} header lacks {field}"
    for group in ("# Model", "# Quantisation/LoRA", "# Data", "# Training",
                  "# Evaluation/Logging"):
        assert f"\n{group}\n" in text, f"{recipe.name} lacks the {group} group"
    assert "integrations.recipe_guard.RecipeGuardPlugin" in load(recipe)["plugins"]


def test_misspelt_key_fails_with_a_suggestion(prepared_data):
    cfg = load(REPO / "recipes" / "mistral-qlora.yml")
    cfg["lora_rnak"] = cfg.pop("lora_r")
    problems = check_recipe(cfg)
    assert problems == ["recipe: unknown key `lora_rnak` (did you mean `lora_r`?)"]
    cfg = load(REPO / "recipes" / "mistral-qlora.yml")
    cfg["datasets"][0]["ds_tpye"] = "json"
    assert check_recipe(cfg) == [
        "recipe: unknown key `datasets[0].ds_tpye` (did you mean `ds_type`?)"]


def test_ill_typed_value_fails_with_one_line_naming_the_field(prepared_data):
    cfg = load(REPO / "recipes" / "mistral-qlora.yml")
    cfg["micro_batch_size"] = "two"
    problems = check_recipe(cfg)
    assert len(problems) == 1
    assert problems[0].startswith("recipe: `micro_batch_size`: Input should be a valid integer")


def test_missing_base_model_fails_clearly(prepared_data):
    cfg = load(REPO / "recipes" / "mistral-qlora.yml")
    del cfg["base_model"]
    assert check_recipe(cfg) == [
        "recipe: missing `base_model`; set a hub id or a local model directory"]


def test_gpu_recipe_on_cpu_is_refused_at_runtime(prepared_data):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    problems = check_recipe(REPO / "recipes" / "mistral-qlora.yml", runtime=True)
    assert len(problems) == 1 and "needs an NVIDIA GPU (load_in_4bit, bf16)" in problems[0]


@pytest.mark.parametrize("what", ["data", "model"])
def test_axolotl_train_with_missing_data_or_model_stops_with_a_clear_line(what, tmp_path,
                                                                          tiny_model):
    overrides = {"output_dir": str(tmp_path / "out")}
    if what == "data":
        overrides["datasets"] = [{"path": str(tmp_path / "nope.jsonl"), "ds_type": "json",
                                  "type": "completion"}]
        expected = f"datasets[0].path `{tmp_path / 'nope.jsonl'}` not found"
    else:
        overrides["base_model"] = "./models/not-built-yet"
        expected = "base_model `./models/not-built-yet` not found"
    recipe = write_recipe(REPO / "recipes" / "tiny-mistral-cpu.yml", tmp_path / "r.yml",
                          **overrides)
    proc = subprocess.run(axolotl("train", recipe), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    # no traceback from axolotl/transformers; only accelerate's launcher reports the exit status
    assert "site-packages/axolotl" not in proc.stderr
    assert "site-packages/transformers" not in proc.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_sequence_len_shorter_than_a_passage_is_refused(tiny_model, prepared_data):
    cfg = load(REPO / "recipes" / "tiny-mistral-cpu.yml")
    cfg["sequence_len"] = 256
    problems = check_recipe(cfg, runtime=True)
    assert len(problems) == 2  # train and eval files
    assert "longer than sequence_len 256" in problems[0] and "--max-tokens" in problems[0]


# ----------------------------------------------------------------------------------------------
# The real tiny run (session fixture: axolotl preprocess + train as subprocesses)


def trainer_log(output_dir: Path) -> list[dict]:
    newest = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((newest / "trainer_state.json").read_text())["log_history"]


def test_tiny_train_loss_falls_and_eval_is_reported(tiny_trained):
    history = trainer_log(tiny_trained.output_dir)
    losses = [row["loss"] for row in history if "loss" in row]
    evals = [row["eval_loss"] for row in history if "eval_loss" in row]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses  # from ~10.4 (ln 32000)
    assert len(evals) >= 2 and evals[-1] < evals[0] - 1.0, evals


def test_tiny_adapter_files_have_the_configured_rank_and_targets(tiny_trained):
    from safetensors import safe_open

    out = tiny_trained.output_dir
    config = json.loads((out / "adapter_config.json").read_text())
    recipe = load(tiny_trained.recipe)
    assert config["r"] == recipe["lora_r"] and config["lora_alpha"] == recipe["lora_alpha"]
    assert set(config["target_modules"]) == LINEAR
    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
        a_shapes = {weights.get_slice(n).get_shape()[0] for n in names if "lora_A" in n}
    assert a_shapes == {recipe["lora_r"]}
    assert {n.split(".")[-3] for n in names if "lora_A" in n} == LINEAR


def test_merge_lora_gives_a_model_that_loads_and_matches_base_plus_adapter(tiny_trained,
                                                                           tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_trained.output_dir
    # merged through a recipe carrying the GPU recipe's plugins and the settings they check:
    # merge-lora loads the recipe with its own overrides (attn_implementation cleared), and a
    # plugin that validated it as a training run would stop the merge
    # (Liger left out: its kernels need Triton and a GPU)
    gpu = load(REPO / "recipes" / "mistral-qlora.yml")
    merge_recipe = write_recipe(
        tiny_trained.recipe, tmp_path / "merge.yml",
        plugins=[p for p in gpu["plugins"] if "liger" not in p],
        **{k: gpu[k] for k in ("sdpa_varlen", "optimizer")})
    proc = run_logged(axolotl("merge-lora", merge_recipe, "--lora-model-dir", str(out)),
                      tmp_path / "merge.log")
    assert proc.returncode == 0, (tmp_path / "merge.log").read_text()[-3000:]
    merged_dir = out / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    inputs = tokenizer("I'm afraid I've created a ", return_tensors="pt")
    generated = merged.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 8

    base = AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny-mistral",
                                                dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        expected = with_adapter(**inputs).logits
        got = merged(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert os.path.getsize(merged_dir / "model.safetensors") > 10_000_000
