"""python -m export: a trained demo run -> merged model -> GGUF (f16, q8_0) that llama.cpp loads
and that behaves like the merged model in transformers; plus the Ollama Modelfile and the
one-line errors. The real test exports the shortened demo run (SmolLM2-135M + a LoRA adapter
trained by axolotl) shared with test_demo.py."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest
from conftest import REPO

from export import LLAMA_CPP_PYTHON_VERSION
from export.__main__ import main as export_main
from export.__main__ import modelfile_text, parse_types
from export.check import NEAR_TIE_LOGITS, PPL_TOLERANCE_PCT, greedy_divergence, hf_token_ids


def test_llama_cpp_python_pin_is_the_same_everywhere():
    """One source: pyproject.toml's `export` extra; export/ and the Makefile read it there."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}" in \
        pyproject["project"]["optional-dependencies"]["export"]
    makefile = (REPO / "Makefile").read_text()
    assert not re.search(r"^LLAMA_CPP_PYTHON_VERSION \?= [0-9]", makefile, re.M)  # not a copy
    shown = subprocess.run(["make", "-s", "--no-print-directory", "--eval",
                            "print-%: ; @echo $($*)", "print-LLAMA_CPP_PYTHON_VERSION"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == LLAMA_CPP_PYTHON_VERSION, shown.stderr


def test_types_are_checked_and_k_quants_bring_their_f16_source():
    assert parse_types("f16,q8_0") == ["f16", "q8_0"]
    assert parse_types("q4_k_m") == ["f16", "q4_k_m"]
    with pytest.raises(Exception, match="unknown GGUF type"):
        parse_types("q3_xs")


def test_modelfile_is_a_plain_completion_template_with_the_stop_token():
    text = modelfile_text("demo-q8_0.gguf", "<|endoftext|>", "demo", 2048)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM ./demo-q8_0.gguf"
    assert 'TEMPLATE """{{ .Prompt }}"""' in lines
    assert 'PARAMETER stop "<|endoftext|>"' in lines
    assert "PARAMETER num_ctx 2048" in lines
    assert "ollama create demo -f Modelfile" in text


def test_greedy_divergence_accepts_only_a_near_tie_on_both_sides():
    import numpy as np

    reference_logits = np.zeros((3, 5), dtype=np.float32)
    reference_logits[:, 1] = 10.0
    reference_logits[1, 2] = 10.0 - 0.01  # step 1: token 2 is all but tied with token 1
    reference_logits[2, 3] = 9.0
    llama_logits = reference_logits.copy()
    llama_logits[1, 2] = 10.0 + 0.02  # rounding flips the tie
    assert greedy_divergence([1, 1, 1], reference_logits, [1, 1, 1], llama_logits) is None
    split = greedy_divergence([1, 1, 1], reference_logits, [1, 2, 4], llama_logits)
    assert split == {"step": 1, "reference_margin": 0.01, "llama_cpp_margin": 0.02,
                     "near_tie": True}
    # a clear choice on the reference side is a real difference, however sure llama.cpp is
    llama_logits[2, 3] = 11.0
    split = greedy_divergence([1, 1, 1], reference_logits, [1, 1, 3], llama_logits)
    assert split["step"] == 2 and split["reference_margin"] == 1.0
    assert split["near_tie"] is False


@pytest.mark.parametrize("case", ["missing", "not-a-run", "adapter-without-weights"])
def test_bad_run_dir_is_one_line_and_exit_2(case, tmp_path, capsys):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "adapter-without-weights":
        (run / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}')
    assert export_main([str(run), "--no-check", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: error:"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_of_the_demo_run_loads_in_llama_cpp_and_matches_transformers(demo_export):
    out = demo_export.out  # python -m export RUN --out RUN/export --name frankenstein-demo
    text = demo_export.log.read_text()
    assert demo_export.returncode == 0, text[-4000:]

    summary = json.loads((out / "export.json").read_text())
    assert summary["passed"] is True
    # the merged model: a plain transformers model directory, no adapter left
    merged = out / "merged"
    assert (merged / "model.safetensors").stat().st_size > 200_000_000  # 134.5 M params, fp32
    assert not (merged / "adapter_config.json").exists()

    # f16 ~ 2 bytes/param, q8_0 ~ 1.06 bytes/param (+ vocab)
    sizes = {t: info["bytes"] for t, info in summary["gguf"].items()}
    assert set(sizes) == {"f16", "q8_0"}
    assert 250e6 < sizes["f16"] < 300e6 and 130e6 < sizes["q8_0"] < 170e6, sizes
    for gguf_type in sizes:
        path = out / f"frankenstein-demo-{gguf_type}.gguf"
        assert path.read_bytes()[:4] == b"GGUF"

    checks = {c["type"]: c for c in summary["checks"]}
    f16, q8 = checks["f16"], checks["q8_0"]
    for check in (f16, q8):
        assert check["tokenizer_matches"], check
        assert check["passage_tokens"] > 100
        assert abs(check["ppl_diff_pct"]) <= PPL_TOLERANCE_PCT[check["type"]], check
    assert f16["greedy_tokens"] == 16
    split = f16["greedy_divergence"]
    if split is None:
        assert f16["greedy_leading_matches"] == 16, f16
    else:  # a near-tie rounding may decide either way (the 6-step adapter has one): check it
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from core.tokens import context_prefix_id

        assert split["near_tie"] and split["step"] == f16["greedy_leading_matches"], f16
        tok = AutoTokenizer.from_pretrained(merged)
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        ids = hf_token_ids(tok, "I'm afraid I've created a", context_prefix_id(tok))
        with torch.no_grad():  # transformers' own greedy steps up to where the two split
            for _ in range(split["step"]):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            top2 = torch.topk(model(torch.tensor([ids])).logits[0, -1], 2).values
        assert float(top2[0] - top2[1]) <= NEAR_TIE_LOGITS, (top2, f16)

    # independent of export's own check: llama.cpp reads the file's metadata and generates
    from llama_cpp import Llama

    llm = Llama(model_path=str(out / "frankenstein-demo-q8_0.gguf"), n_ctx=256, verbose=False)
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.detokenize([llm.token_eos()], special=True) == b"<|endoftext|>"
    assert "tokenizer.chat_template" not in llm.metadata
    completion = llm("It was on a dreary night of November that", max_tokens=12, temperature=0)
    assert completion["usage"]["completion_tokens"] > 0
    llm.close()

    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./frankenstein-demo-q8_0.gguf" in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile
    tail = text.strip().splitlines()
    assert any(line.startswith("llama.cpp check: passed") for line in tail[-6:]), tail[-6:]
