"""`python -m eval RECIPE_OR_RUN`: the three evaluations with one model load, same outputs."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import yaml
from _eval_helpers import REPO, TEXTS, adapter_dir, tiny_model_dir, write_jsonl

from core.runs import CONTROL_CORPUS_PPL, HELD_OUT_CORPUS_PPL, Run
from eval import generate, perplexity
from eval.pipeline import evaluate, main


def _recipe(tmp_path, run):
    train = write_jsonl(tmp_path / "train.jsonl", TEXTS * 3)
    held_out = write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "base_model": str(tiny_model_dir()), "output_dir": str(run), "adapter": "lora",
        "datasets": [{"path": str(train), "type": "completion"}],
        "test_datasets": [{"path": str(held_out), "type": "completion", "split": "train"}],
        "special_tokens": {"pad_token": "</s>"},
    }))
    return recipe, train, held_out


def test_recipe_evaluation_equals_the_three_scripts(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir("nonzero"), run)
    recipe, train, held_out = _recipe(tmp_path, run)
    small = ["--max-new-tokens", "8", "--prompt", "It was on a dreary night"]
    assert main([str(recipe), "--no-progress", "--window", "64", "--stride", "32", *small]) == 0
    printed = capsys.readouterr().out
    outputs = {p.name for p in (run / "eval").iterdir()}
    assert {"perplexity.json", "perplexity.md", "generations.json", "generations.md",
            "evaluation.json"} <= outputs
    assert (run / "report.md").is_file()
    summary = json.loads((run / "eval" / "evaluation.json").read_text())
    assert summary["parts"] == ["perplexity", "generate", "report"]
    assert set(summary["seconds"]) == {"load", "perplexity", "generate", "report", "total"}
    assert summary["generation"]["tokens_per_s"] > 0
    assert f"evaluated {run} in " in printed and "generated tokens/s" in printed
    ppl = json.loads((run / "eval" / "perplexity.json").read_text())
    gens = json.loads((run / "eval" / "generations.json").read_text())
    # from the recipe: held-out = its test_datasets, memorisation text = its datasets
    assert [d["path"] for d in ppl["datasets"]] == [str(held_out), str(REPO / "eval" /
                                                                       "control_passage.txt")]
    assert ppl["models"] == ["base", "adapter"] and gens["memorisation"]["train"] == str(train)
    # the key figures, named as core.runs names them (what the demo and gpu-check read)
    for key, dataset in ((HELD_OUT_CORPUS_PPL, ppl["datasets"][0]),
                         (CONTROL_CORPUS_PPL, ppl["datasets"][1])):
        assert summary[key] == {"base": dataset["metrics"]["base"]["corpus_ppl"],
                                "adapter": dataset["metrics"]["adapter"]["corpus_ppl"],
                                "change_pct": dataset["relative_change_pct"]["corpus_ppl"]}
    assert Run.from_recipe(recipe).evaluation_json == run / "eval" / "evaluation.json"
    # from Python, with the command line's options: the report again, no model load
    again = evaluate(recipe, "--skip", "perplexity,generate")
    assert again["parts"] == ["report"] and set(again["seconds"]) == {"report", "total"}

    # the standalone scripts the summary names give the same numbers and texts
    standalone = tmp_path / "standalone"
    ppl_cmd = shlex.split(summary["commands"]["perplexity"])[3:] + ["--out", str(standalone)]
    gen_cmd = shlex.split(summary["commands"]["generate"])[3:]
    assert perplexity.main(ppl_cmd) == 0
    assert generate.main([*gen_cmd[: gen_cmd.index("--prompt")], "--prompt",
                          "It was on a dreary night", "--out", str(standalone)]) == 0
    again = json.loads((standalone / "perplexity.json").read_text())
    for got, want in zip(again["datasets"], ppl["datasets"], strict=True):
        for model in ("base", "adapter"):
            got["metrics"][model].pop("tokens_per_s")
            want["metrics"][model].pop("tokens_per_s")
        assert got["metrics"] == want["metrics"]
    texts = [g["text"] for g in json.loads((standalone / "generations.json").read_text())[
        "generations"]]
    assert texts == [g["text"] for g in gens["generations"]]


def test_bad_target_fails_fast_with_one_line(tmp_path):
    run = tmp_path / "no-run"
    recipe, _, _ = _recipe(tmp_path, run)
    for target, expected in ((recipe, f"error: {run}/adapter_config.json not found: train first"),
                             (tmp_path / "nothing", f"error: {tmp_path / 'nothing'} not found")):
        proc = subprocess.run([sys.executable, "-m", "eval", str(target)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(expected), lines[0]


def test_recipe_in_4bit_on_a_cpu_says_how_to_evaluate_anyway(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        return
    run = tmp_path / "run"
    shutil.copytree(adapter_dir("nonzero"), run)
    recipe, _, _ = _recipe(tmp_path, run)
    cfg = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**cfg, "load_in_4bit": True}))
    capsys.readouterr()  # (building the adapter above may have logged library noise)
    assert main([str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe} sets load_in_4bit: true, which needs a CUDA GPU (bitsandbytes nf4): "
        "pass --no-load-in-4bit to evaluate in fp32 on this CPU")
    assert not (run / "eval").exists()
