"""Tests of bench/: FLOP formula, token counting, configs, and real CPU runs of the benchmark.

The end-to-end test runs the real thing on a 4.2 M-parameter Mistral: the notebook baseline
(4-bit bitsandbytes, paged 8-bit AdamW, HF Trainer) and a real `python -m axolotl.cli.train`
subprocess with the throughput plugin, then eval.perplexity on the adapter it saved.
The `gpu` test repeats (a) and (b) on a CUDA GPU (deselected by default).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import train_throughput
from bench.flops import DecoderShape, causal_pairs, step_flops, utilisation
from bench.variants import VARIANTS

REPO = Path(__file__).resolve().parent.parent

# axolotl's examples/mistral/qlora.yml, with local data and sdpa (no flash-attn package); the
# benchmark overrides model, steps, saving and evaluation itself.
QLORA_EXAMPLE = """
base_model: mistralai/Mistral-7B-v0.1
plugins:
  - integrations.recipe_guard.RecipeGuardPlugin
special_tokens:
  pad_token: "</s>"
load_in_4bit: true
adapter: qlora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
datasets:
  - path: {train}
    ds_type: json
    type: completion
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/qlora-out
sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true
attn_implementation: sdpa
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
bf16: auto
tf32: false
gradient_checkpointing: true
logging_steps: 1
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
"""

SENTENCE = ("the creature wandered over the ice and I beheld with horror the wretch whom I had "
            "created ; my heart sickened , yet he spoke of solitude , of fire and of the moon")
WORDS = tuple(SENTENCE.split())


def write_rows(path: Path, n_rows: int, words: tuple[int, int], seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
             for _ in range(n_rows)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


@pytest.fixture(scope="module")
def env_offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "AXOLOTL_DO_NOT_TRACK")}
    os.environ.update(HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, env_offline):
    """A tiny random Mistral (real tokenizer), data files and the QLoRA example recipe."""
    from bench.build_random_mistral import build

    root = tmp_path_factory.mktemp("bench")
    model = build(root / "tiny-mistral", tiny=True, device="cpu")
    data = {
        # 6 chunk-like rows (~150-250 tokens): batch 2 -> one epoch is 3 optimizer steps
        "notebook_train": write_rows(root / "nb_train.jsonl", 6, (120, 200), seed=1),
        "eval": write_rows(root / "eval.jsonl", 3, (60, 120), seed=2),
        "train": write_rows(root / "train.jsonl", 24, (300, 500), seed=3),
    }
    recipe = root / "qlora.yml"
    recipe.write_text(QLORA_EXAMPLE.format(train=root / "train.jsonl"))
    return {"root": root, "model": model, "recipe": recipe, "texts": data}


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# -- FLOP formula -----------------------------------------------------------------------------

MISTRAL_7B = DecoderShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          vocab_size=32000, sliding_window=4096)


def test_linear_params_of_mistral_7b_by_hand():
    per_layer = (4096 * 4096      # q_proj
                 + 4096 * 1024    # k_proj (8 KV heads x 128)
                 + 4096 * 1024    # v_proj
                 + 4096 * 4096    # o_proj
                 + 3 * 4096 * 14336)  # gate, up, down
    assert per_layer == 218_103_808
    assert MISTRAL_7B.linear_params == 32 * per_layer + 4096 * 32000 == 7_110_393_856
    assert MISTRAL_7B.attention_width == 32 * 32 * 128


def test_random_mistral_shape_is_mistral_7b():
    """The builder's config instantiated on the meta device has 7.24 B parameters, and its
    nn.Linear weights are exactly the dense linear parameters the FLOP formula counts."""
    import torch
    from transformers import MistralForCausalLM

    from bench.build_random_mistral import MISTRAL_7B_PARAMS, MISTRAL_7B_SHAPE
    from models.tiny_mistral import mistral_config

    config = mistral_config(**MISTRAL_7B_SHAPE)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == MISTRAL_7B_PARAMS == 7_241_732_096
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert DecoderShape.from_config(config) == MISTRAL_7B
    assert linear == MISTRAL_7B.linear_params


def test_causal_pairs_against_enumeration():
    for length, window in [(1, None), (7, None), (7, 3), (10, 10), (10, 4), (4096, 4096)]:
        brute = sum(min(i, window or i) for i in range(1, length + 1))
        assert causal_pairs(length, window) == brute


def test_step_flops_and_mfu_by_hand():
    # one step of 2 packed rows of 4096: documents 1000 + 3096 and 4096; LoRA r=32 on q,v
    docs = [1000, 3096, 4096]
    tokens = sum(docs)
    pairs = sum(n * (n + 1) // 2 for n in docs)
    lora = 32 * ((4096 + 4096) + (4096 + 1024)) * 32  # q: 4096->4096, v: 4096->1024, 32 layers
    assert lora == 13_631_488
    n_lin, n_lm, width = 7_110_393_856, 4096 * 32000, 32 * 32 * 128
    forward = 2 * n_lin + 2 * lora
    backward = 2 * n_lin + 4 * lora
    recompute = 2 * (n_lin - n_lm) + 2 * lora
    expected_model = tokens * (forward + backward) + pairs * (4 + 8) * width
    expected_hardware = expected_model + tokens * recompute + pairs * 4 * width
    model, hardware = step_flops(MISTRAL_7B, tokens, pairs, lora, gradient_checkpointing=True)
    assert model == expected_model
    assert hardware == expected_hardware
    assert step_flops(MISTRAL_7B, tokens, pairs, lora, False) == (model, model)
    # 8192 x 4 x 7.11e9 = 2.33e14 dense + 12 x 131072 x 13.7e6 = 0.22e14 attention: 2.55e14,
    # so 1.3 s/step on one H100 would be ~20 % MFU
    assert model == pytest.approx(2.33e14 + 0.0067e14 + 0.2152e14, rel=1e-3)
    assert utilisation(model, 1.3) == pytest.approx(model / 1.3 / 989.4e12)
    assert utilisation(model, 1.3, n_gpus=2, peak=790e12) == pytest.approx(model / 2.6 / 790e12)


# -- token counting ---------------------------------------------------------------------------


def test_batch_token_stats_on_axolotl_packing_collator(workspace):
    """Real tokens and attended pairs of a batch made by axolotl's multipack collator, with
    its numbered attention mask and (as for sdpa packing) with the mask dropped."""
    from axolotl.utils.collators import V2BatchSamplerDataCollatorForSeq2Seq

    from bench.step_recorder import batch_token_stats

    tokenizer = tokenizer_of(workspace["model"])
    tokenizer.pad_token = tokenizer.eos_token

    def doc(n):
        ids = list(range(100, 100 + n))
        return {"input_ids": ids, "attention_mask": [1] * n, "labels": ids,
                "position_ids": list(range(n))}

    packs = [[doc(5), doc(7)], [doc(9)]]  # row 1: two documents, row 2: one; padded to 16
    collator = V2BatchSamplerDataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True,
                                                    pad_to_multiple_of=16, return_tensors="pt")
    batch = collator(packs)
    assert batch["input_ids"].shape == (2, 16)
    expected = (5 + 7 + 9, 15 + 28 + 45)
    tokens, pairs = batch_token_stats(batch, window=None)
    assert (int(tokens), int(pairs)) == expected
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    tokens, pairs = batch_token_stats(no_mask, window=None)
    assert (int(tokens), int(pairs)) == expected
    tokens, pairs = batch_token_stats(batch, window=4)  # sum_i min(i, 4)
    assert int(pairs) == sum(causal_pairs(n, 4) for n in (5, 7, 9))


def test_batch_token_stats_on_padded_rows(workspace):
    """The notebook's batches: rows padded to the longer one, no packing."""
    from transformers import DataCollatorForLanguageModeling

    from bench.step_recorder import batch_token_stats

    tokenizer = tokenizer_of(workspace["model"])
    tokenizer.pad_token = tokenizer.eos_token
    rows = [tokenizer("It was on a dreary night of November"),
            tokenizer("I beheld the wretch, the miserable monster whom I had created; he held "
                      "up the curtain of the bed")]
    lengths = [len(r["input_ids"]) for r in rows]
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(rows)
    assert batch["input_ids"].shape[1] == max(lengths) > min(lengths)
    tokens, pairs = batch_token_stats(batch, window=4096)
    assert int(tokens) == sum(lengths)
    assert int(pairs) == sum(n * (n + 1) // 2 for n in lengths)


# -- configs ----------------------------------------------------------------------------------


def test_axolotl_config_overrides(workspace, tmp_path):
    recipe = yaml.safe_load(workspace["recipe"].read_text())
    cfg = train_throughput.axolotl_config(
        recipe, VARIANTS["no_ckpt_liger"]["overrides"], model_dir=Path("/m"),
        run_dir=tmp_path, prepared_dir=tmp_path / "p", max_steps=13, cpu=False,
        sets={"sequence_len": 1024})
    assert cfg["base_model"] == "/m" and cfg["max_steps"] == 13
    assert cfg["output_dir"] == str(tmp_path / "out")
    assert cfg["save_strategy"] == "no" and cfg["eval_strategy"] == "no"
    for gone in ("saves_per_epoch", "evals_per_epoch", "loss_watchdog_threshold"):
        assert gone not in cfg
    assert cfg["gradient_checkpointing"] is False and cfg["sequence_len"] == 1024
    assert cfg["plugins"] == ["integrations.recipe_guard.RecipeGuardPlugin",
                              "axolotl.integrations.liger.LigerPlugin",
                              "bench.axolotl_plugin.ThroughputPlugin"]
    assert cfg["liger_fused_linear_cross_entropy"] is True
    assert recipe["gradient_checkpointing"] is True  # the recipe itself is untouched
    cpu = train_throughput.axolotl_config(
        cfg, VARIANTS["no_liger"]["overrides"], model_dir=Path("/m"), run_dir=tmp_path,
        prepared_dir=tmp_path, max_steps=3, cpu=True, sets={})
    assert "axolotl.integrations.liger.LigerPlugin" not in cpu["plugins"]
    assert cpu["plugins"].count("bench.axolotl_plugin.ThroughputPlugin") == 1
    assert "liger_rms_norm" not in cpu
    assert (cpu["bf16"], cpu["load_in_4bit"], cpu["adapter"]) == (False, False, "lora")
    assert cpu["lora_qkv_kernel"] is False


def test_every_axolotl_variant_passes_axolotl_validation(workspace, tmp_path, monkeypatch,
                                                        prepared_data):
    """Each variant's generated config, on the QLoRA example and on the project's GPU recipe
    when it exists, has only known axolotl keys and values axolotl's schema accepts."""
    from integrations.recipe_guard import check_recipe

    monkeypatch.chdir(REPO)  # recipes name their data relative to the repo root
    recipes = [workspace["recipe"]] + [p for p in [REPO / train_throughput.DEFAULT_RECIPE]
                                       if p.is_file()]
    problems = []
    for recipe_path in recipes:
        recipe = yaml.safe_load(recipe_path.read_text())
        for name, variant in VARIANTS.items():
            if variant["kind"] != "axolotl":
                continue
            own = variant.get("recipe")  # a peer's own config file
            base = yaml.safe_load((REPO / own).read_text()) if own else recipe
            cfg = train_throughput.axolotl_config(
                base, variant["overrides"], model_dir=workspace["model"],
                run_dir=tmp_path / name, prepared_dir=tmp_path / "prepared", max_steps=13,
                cpu=False, sets={})
            problems += [f"{recipe_path.name} {name}: {p}" for p in check_recipe(cfg)]
    assert problems == []


def test_unknown_variant_and_bad_set_are_one_line_errors(workspace):
    with pytest.raises(SystemExit, match="--variants: unknown nope"):
        train_throughput.main(["--model", str(workspace["model"]), "--variants", "nope"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        train_throughput.main(["--model", str(workspace["model"]), "--variants", "recipe",
                               "--recipe", str(workspace["recipe"]), "--set", "oops"])
    with pytest.raises(SystemExit, match="no config.json there"):
        train_throughput.main(["--model", str(workspace["root"]), "--variants", "recipe"])


# -- runner mechanics -------------------------------------------------------------------------


def test_budget_guard_skips_and_timeout_kills(workspace, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    common = ["--model", str(workspace["model"]), "--recipe", str(workspace["recipe"]),
              "--results", str(results), "--work-dir", str(tmp_path / "runs"), "--cpu",
              "--notebook-train", str(workspace["root"] / "nb_train.jsonl")]
    assert train_throughput.main([*common, "--variants", "notebook,recipe",
                                  "--budget-s", "0"]) == 0
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["status"].split(" (")[0] for r in lines] == ["skipped: budget"] * 2
    # a run that cannot finish in 3 s is killed (with its whole process group) and reported
    assert train_throughput.main([*common, "--variants", "notebook",
                                  "--run-timeout-s", "3"]) == 1
    last = json.loads(results.read_text().splitlines()[-1])
    assert last["status"] == "timeout" and last["wall_s"] < 3 + train_throughput.KILL_GRACE_S + 5
    assert "timeout" in capsys.readouterr().out


def test_run_device_script_fails_clearly_without_carried_files(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "run_device.sh", tmp_path / "bench")
    run = subprocess.run(["bash", "bench/run_device.sh"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert run.returncode == 2  # a missing input (core/errors.py)
    assert "data/prepared/clean/train.jsonl missing" in run.stderr
    for mode in ("clean", "seed"):
        (tmp_path / "data" / "prepared" / mode).mkdir(parents=True)
        (tmp_path / "data" / "prepared" / mode / "train.jsonl").write_text('{"text": "x"}\n')
    run = subprocess.run(["bash", "bench/run_device.sh"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert run.returncode == 2 and ".whl/*.whl missing" in run.stderr
    assert "bash offline/fetch_wheels.sh .whl --python X.Y" in run.stderr  # the repository's own
    assert len(run.stderr.strip().splitlines()) == 1


def test_run_device_script_on_cpu(workspace, tmp_path):
    """The GPU machine's script, end to end, on a CPU: checks, versions, model build, the
    notebook run, the files it leaves in $OUT and the table last."""
    tree = tmp_path / "repo"

    def code_only(folder, names):  # leave built models, results and caches behind
        return [n for n in names if n == "__pycache__" or (Path(folder, n).is_dir()
                                                            and Path(folder).name == "models")]

    for package in ("core", "bench", "models", "recipes", "data_prep"):
        shutil.copytree(REPO / package, tree / package, ignore=code_only)
    for mode in ("clean", "seed"):
        folder = tree / "data" / "prepared" / mode
        folder.mkdir(parents=True)
        shutil.copy(workspace["root"] / "nb_train.jsonl", folder / "train.jsonl")
        shutil.copy(workspace["root"] / "eval.jsonl", folder / "eval.jsonl")
    shutil.copy(workspace["recipe"], tree / "recipes" / "mistral-qlora.yml")
    from bench.build_random_mistral import main as build_main

    assert build_main(["--tokenizer-only", "--out", str(tree / "models/mistral-tokenizer")]) == 0
    out = tmp_path / "out"
    earlier_call = tmp_path / "runs" / "unsloth" / "steps.rank0.jsonl"  # a warm machine's leftover
    earlier_call.parent.mkdir(parents=True)
    earlier_call.write_text(json.dumps({"event": "step", "label": "unsloth"}) + "\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # the copy's own code
           "OUT": str(out), "PYTHON": sys.executable, "INSTALL_WHEELS": "0",
           "BUILD_ARGS": "--tiny --device cpu", "MODEL_DIR": str(tmp_path / "model"),
           "WORK_DIR": str(tmp_path / "runs"), "VARIANTS": "notebook", "WARMUP": "1",
           "STEPS": "1", "BUDGET_S": "300"}
    run = subprocess.run(["bash", "bench/run_device.sh", "--cpu", "--threads", "2"], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "build.log", "env.txt", "runs.log", "steps.jsonl", "throughput.jsonl"]
    assert "random Mistral: 4,170,048 parameters" in (out / "build.log").read_text()
    (result,) = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert result["variant"] == "notebook" and result["status"] == "ok"
    events = [json.loads(line)["event"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert events == ["meta", "step", "step", "end", "eval_forward"]
    tail = run.stdout.strip().splitlines()
    assert tail[-1].startswith("[run_device] done in") and "notebook  ok" in "\n".join(tail[-6:])


# -- the real thing on a CPU ------------------------------------------------------------------


def read_steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.rank0.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cpu_benchmark_end_to_end(workspace, tmp_path, capsys):
    """Notebook baseline (2 measured steps), axolotl + plugin (2 measured steps) and
    eval.perplexity, for real, on a CPU."""
    results = tmp_path / "results.jsonl"
    work = tmp_path / "runs"
    root = workspace["root"]
    rc = train_throughput.main([
        "--model", str(workspace["model"]), "--recipe", str(workspace["recipe"]),
        "--variants", "notebook,recipe,eval_ppl", "--warmup", "1", "--steps", "2",
        "--results", str(results), "--work-dir", str(work), "--cpu", "--threads", "2",
        "--notebook-train", str(root / "nb_train.jsonl"),
        "--notebook-eval", str(root / "eval.jsonl"), "--eval-data", str(root / "eval.jsonl"),
        "--set", "sequence_len=1024", "--set", "gradient_accumulation_steps=1"])
    out = capsys.readouterr().out
    lines = {r["variant"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert rc == 0, out
    assert [lines[v]["status"] for v in ("notebook", "recipe", "eval_ppl")] == ["ok"] * 3

    tokenizer = tokenizer_of(workspace["model"])
    lengths = [len(tokenizer(t, truncation=True, max_length=512)["input_ids"])
               for t in workspace["texts"]["notebook_train"]]
    tiny = DecoderShape.from_config(_config(workspace["model"]))
    assert tiny.num_hidden_layers == 2 and tiny.hidden_size == 64

    # (a) notebook: 3 steps of 2 rows = exactly one epoch, so every row's tokens were counted
    notebook, steps = lines["notebook"], read_steps(work / "notebook")
    train_steps = [s for s in steps if s["event"] == "step"]
    assert [s["step"] for s in train_steps] == [1, 2, 3]
    assert sum(s["tokens"] for s in train_steps) == sum(lengths)
    # LoRA r=32 on q (64->64) and v (64->32) in 2 layers
    assert notebook["trainable_params"] == 2 * 32 * ((64 + 64) + (64 + 32)) == 14_336
    assert notebook["gradient_checkpointing"] is True
    assert notebook["steps_measured"] == 2 and notebook["tokens_per_s"] > 0
    assert notebook["step_s_median"] > 0 and notebook["step_s_mean"] > 0
    assert math.isfinite(notebook["final_loss"]) and 9 < notebook["final_loss"] < 12
    for s in train_steps:
        assert (s["model_flops"], s["hardware_flops"]) == step_flops(
            tiny, s["tokens"], s["attn_pairs"], 14_336, gradient_checkpointing=True)
    eval_lengths = [len(tokenizer(t)["input_ids"]) for t in workspace["texts"]["eval"]]
    forward = next(s for s in steps if s["event"] == "eval_forward")
    assert forward["tokens"] == sum(eval_lengths) and notebook["eval_forward_tokens_per_s"] > 0

    # (b) axolotl + plugin: LoRA r=32 on all 7 linear layers of 2 layers (QLoRA -> LoRA on CPU)
    recipe = lines["recipe"]
    assert recipe["trainable_params"] == 2 * 32 * (
        (64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128)) == 65_536
    config = yaml.safe_load((work / "recipe" / "config.yml").read_text())
    assert config["plugins"][-1] == "bench.axolotl_plugin.ThroughputPlugin"
    assert config["max_steps"] == 3 and config["sequence_len"] == 1024
    train_steps = [s for s in read_steps(work / "recipe") if s["event"] == "step"]
    assert [s["step"] for s in train_steps] == [1, 2, 3]
    for s in train_steps:  # packed 2 x 1024: most of the slots, never more
        assert 1024 < s["tokens"] <= 2 * 1024 and s["step_s"] > 0 and math.isfinite(s["loss"])
    assert recipe["tokens_per_s"] > 0 and recipe["losses_finite"] is True
    assert recipe["tokens_per_step"] == sum(s["tokens"] for s in train_steps[1:]) / 2

    # eval.perplexity timed on the adapter the recipe run saved
    assert lines["eval_ppl"]["adapter"] == str(work / "recipe" / "out")
    assert lines["eval_ppl"]["eval_base_tokens_per_s"] > 0
    assert lines["eval_ppl"]["eval_adapter_tokens_per_s"] > 0

    table = out[out.index("variant  "):]
    assert "notebook" in table and "recipe" in table and "eval.perplexity" in table
    assert train_throughput.main(["--table", str(results)]) == 0


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


# -- the same on a GPU ------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_notebook_and_recipe(workspace, tmp_path):
    """(a) and (b) for 1 + 2 steps on a CUDA GPU with the tiny model: 4-bit, bf16/fp16."""
    results = tmp_path / "results.jsonl"
    root = workspace["root"]
    rc = train_throughput.main([
        "--model", str(workspace["model"]), "--recipe", str(workspace["recipe"]),
        "--variants", "notebook,recipe", "--warmup", "1", "--steps", "2",
        "--results", str(results), "--work-dir", str(tmp_path / "runs"),
        "--notebook-train", str(root / "nb_train.jsonl"),
        "--notebook-eval", str(root / "eval.jsonl"), "--set", "sequence_len=1024"])
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert rc == 0 and [r["status"] for r in lines] == ["ok", "ok"]
    for r in lines:
        assert r["peak_alloc_gib"] > 0 and r["peak_reserved_gib"] >= r["peak_alloc_gib"]
        assert r["mfu_pct"] > 0 and r["tokens_per_s"] > 0 and r["device"]


def test_cli_list_runs_without_heavy_imports():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench.train_throughput",
                          "--list"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and "notebook" in run.stdout and "recipe" in run.stdout
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines()}
    assert "yaml" in imported and "torch" not in imported  # the orchestrator never loads torch


def test_summary_merges_ranks_and_drops_warmup():
    """Two GPUs: tokens and FLOPs add up, the slower rank sets the step time, memory is the
    larger GPU's; warm-up steps are left out."""
    def step(rank, number, seconds, tokens, alloc):
        flops = step_flops(MISTRAL_7B, tokens, tokens * 500, 0, False)
        return {"event": "step", "rank": rank, "step": number, "step_s": seconds,
                "tokens": tokens, "model_flops": flops[0], "hardware_flops": flops[1],
                "loss": 10.0 + rank, "peak_alloc_gib": alloc, "peak_reserved_gib": alloc + 1}

    meta = {"event": "meta", "world_size": 2, "trainable_params": 7, "device": "H100",
            "load": {"peak_alloc_gib": 4.0}}
    records = [meta, {**meta, "rank": 1}]
    records += [step(0, 1, 9.0, 8000, 30.0), step(1, 1, 9.5, 8000, 31.0)]  # warm-up
    records += [step(0, 2, 1.0, 8000, 10.0), step(1, 2, 1.2, 8100, 11.0)]
    records += [step(0, 3, 1.4, 8000, 10.0), step(1, 3, 1.1, 7900, 12.0)]
    summary = train_throughput.summarize(records, warmup=1)
    assert summary["steps_measured"] == 2 and summary["gpus"] == 2
    assert summary["tokens_per_s"] == pytest.approx((16100 + 15900) / (1.2 + 1.4))
    assert summary["step_s_median"] == pytest.approx(1.3)
    assert summary["final_loss"] == pytest.approx(10.5)
    assert summary["peak_alloc_gib"] == 31.0  # warm-up steps count for memory, not for speed
    flops = sum(r["model_flops"] for r in records[4:])
    assert summary["mfu_pct"] == pytest.approx(100 * flops / (2.6 * 2 * 989.4e12))


def probe_recorder(tmp_path, monkeypatch, **env: str):
    """A StepRecorder labelled `probe` with the given BENCH_* settings, and the Trainer objects
    its callbacks take, for driving it by hand."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from bench.step_recorder import StepRecorder

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    recorder = StepRecorder(tmp_path / "steps.jsonl", MISTRAL_7B, False, label="probe")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    return recorder, args, TrainerState(), TrainerControl()


def test_profiled_step_reports_summed_kernel_time_against_the_step(tmp_path, monkeypatch):
    """BENCH_PROFILE_STEP=N: the profile of step N says how much of the step the device (here
    the CPU's own ops) was busy, next to the step's wall time, and lists the ops."""
    import torch
    recorder, args, state, control = probe_recorder(tmp_path, monkeypatch, BENCH_PROFILE_STEP="2")
    for step in range(2):
        recorder.on_step_begin(args, state, control)
        x = torch.randn(256, 256)
        for _ in range(20):
            x = torch.tanh(x @ x)
        state.global_step = step + 1
        recorder.on_step_end(args, state, control)
    header = recorder.out_path.with_suffix(".profile.txt").read_text().splitlines()[0]
    busy, step = (float(v) for v in re.findall(r"([\d.]+) ms", header))
    assert header.startswith("# probe: optimizer step 2") and "of the step's" in header
    assert 0 < busy <= step * 1.05  # the ops ran inside the step that was timed
    records = [json.loads(line) for line in recorder.out_path.read_text().splitlines()]
    assert abs(records[-1]["compute_s"] * 1e3 - step) < 0.1


def test_gpu_gaps_finds_each_idle_interval_and_where_the_host_was(tmp_path):
    """bench/gpu_gaps.py on a trace whose gaps are known: two gaps (200 and 1,000 us), each
    named by the innermost Python frames at its midpoint; a 50 us gap is under the threshold."""
    import gzip

    from bench.gpu_gaps import find_gaps, load_trace, summary

    def event(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        event("kernel", "k1", 1000, 100), event("gpu_memcpy", "copy", 1300, 100),
        event("kernel", "k2", 2400, 100), event("kernel", "k3", 2550, 50),
        event("python_function", "train_loop", 990, 2000),
        event("python_function", "next_batch", 1100, 200),
        event("python_function", "optimizer_step", 1400, 1000),
        event("cpu_op", "aten::item", 1410, 980),
        {"ph": "i", "cat": "instant", "name": "marker", "ts": 5},  # not a span: ignored
    ]}
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(trace, handle)
    gaps, totals = find_gaps(load_trace(path), min_gap_us=100)
    assert [(g.start_us, g.length_us) for g in gaps] == [(110.0, 200.0), (410.0, 1000.0)]
    assert gaps[0].frames == ("next_batch", "train_loop") and gaps[0].op is None
    assert gaps[1].frames == ("optimizer_step", "train_loop") and gaps[1].op == "aten::item"
    assert totals == {"device_events": 4, "span_us": 1600.0, "busy_us": 350.0, "gaps": 2,
                      "gaps_us": 1200.0}
    text = summary(gaps, totals)
    assert text.splitlines()[0] == ("device busy 0.3 ms of 1.6 ms from its first to its last "
                                    "event; 2 gaps = 1.2 ms idle")
    assert "   1.00     1  optimizer_step < train_loop" in text
    assert summary(*find_gaps({"traceEvents": []})) == "no device events in the trace"


def test_sync_log_counts_each_wait_by_call_site_until_the_next_step(tmp_path, monkeypatch):
    """BENCH_SYNC_STEP=N: the warnings torch's sync debug mode raises from step N's begin to
    step N+1's (here raised by hand: a CPU has no GPU to wait for) are counted by call site,
    and nothing outside that window."""
    import warnings

    def wait_for_gpu():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)

    recorder, args, state, control = probe_recorder(tmp_path, monkeypatch, BENCH_SYNC_STEP="2")
    for step in range(3):
        recorder.on_step_begin(args, state, control)
        for _ in range(step + 1):
            wait_for_gpu()
        state.global_step = step + 1
        recorder.on_step_end(args, state, control)
        wait_for_gpu()  # after the step: its logging
    lines = recorder.out_path.with_suffix(".syncs.txt").read_text().splitlines()
    assert lines[0] == "# probe: host waits for the GPU during optimizer step 2: 3"
    assert len(lines) == 3  # two call sites: in the step (twice) and after it (once)
    counts = sorted(int(line.split()[0]) for line in lines[1:])
    assert counts == [1, 2]
    for line in lines[1:]:
        message, where = line.split(None, 1)[1].split(" | ")
        assert message == "called a synchronizing CUDA operation"
        assert where.split(" < ")[0].endswith(":wait_for_gpu")
        assert where.split(" < ")[1].endswith(":test_sync_log_counts_each_wait_by_call_site_until_the_next_step")
