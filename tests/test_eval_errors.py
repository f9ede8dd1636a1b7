"""Errors on the GPU path are one true line: hub refusals, CUDA out of memory, an old driver.

The hub cases run the real `python -m eval.perplexity` against a local stand-in for the
Hugging Face hub (HF_ENDPOINT on 127.0.0.1) that answers every request the way the real hub
answers a gated, missing or wrongly authenticated model (status code + X-Error-Code /
X-Error-Message headers): huggingface_hub, transformers and our loader all run unchanged.
Out-of-memory and driver errors are classified from real exception objects and torch's own
message texts (a real out-of-memory while loading runs in the `gpu`-marked test).
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import pytest
from _eval_helpers import REPO, TEXTS, tiny_model_dir, write_jsonl
from conftest import repo_env

from core.diagnostics import (
    cuda_init_problem,
    cuda_unavailable_problem,
    hub_problem,
    load_problem,
    oom_problem,
)

MODEL = "mistralai/Mistral-7B-v0.1"
# (status, X-Error-Code, X-Error-Message) as the hub sends them
HUB_ANSWERS = {
    "gated, no token": (401, "GatedRepo", f"Access to model {MODEL} is restricted. You must have "
                        "access to it and be authenticated to access it. Please log in."),
    "gated, no access": (403, "GatedRepo", f"Access to model {MODEL} is restricted and you are "
                         "not in the authorized list. Visit https://huggingface.co/"
                         f"{MODEL} to ask for access."),
    "invalid token": (401, None, "Invalid credentials in Authorization header"),
    "no such model": (404, "RepoNotFound", "Repository not found"),
}
EXPECTED = {
    "gated, no token": f"error: model {MODEL} is gated on the Hugging Face hub and no token is "
                       "set (HTTP 401): accept its terms at https://huggingface.co/" + MODEL,
    "gated, no access": f"error: model {MODEL} is gated on the Hugging Face hub and the account "
                        "of HF_TOKEN has no access to it (HTTP 403): accept its terms at "
                        "https://huggingface.co/" + MODEL,
    "invalid token": "error: the Hugging Face hub rejected HF_TOKEN while fetching "
                     f"{MODEL} (HTTP 401: invalid or expired token): create a new read token",
    "no such model": f"error: model {MODEL} was not found on the Hugging Face hub with HF_TOKEN "
                     "(HTTP 404): check the id",
}


class FakeHub:
    """A local HTTP server answering every request with one of HUB_ANSWERS."""

    def __init__(self, answer):
        status, code, message = answer
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                requests.append(f"{self.command} {self.path}")
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("case", list(HUB_ANSWERS))
def test_hub_refusal_is_one_line_naming_the_fix(case, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    out = tmp_path / "out"
    with FakeHub(HUB_ANSWERS[case]) as hub:
        env = repo_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
        env.pop("HF_TOKEN", None)
        if case != "gated, no token":
            env["HF_TOKEN"] = "hf_FAKEtokenForTheLocalStandInHub0123"
        proc = subprocess.run(
            [sys.executable, "-m", "eval.perplexity", "--model", MODEL, "--data", str(data),
             "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert hub.requests, "the loader never asked the (stand-in) hub"
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(EXPECTED[case]), lines[0]
    assert "--tokenizer" not in lines[0]  # not the generic "pass --tokenizer DIR" any more
    assert "hf_FAKE" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_hub_classifier_reads_transformers_wrapped_errors():
    """transformers re-raises huggingface_hub's error as OSError(...) from it: the chain is
    followed; an unrelated error is left to the caller's generic message."""
    import httpx
    from huggingface_hub.errors import GatedRepoError

    url = f"https://huggingface.co/{MODEL}/resolve/main/config.json"
    response = httpx.Response(403, request=httpx.Request("HEAD", url))
    try:
        try:
            raise GatedRepoError("403 Client Error. Cannot access gated repo", response=response)
        except GatedRepoError as inner:
            raise OSError("You are trying to access a gated repo.") from inner
    except OSError as wrapped:
        message = hub_problem(wrapped, MODEL)
    assert message and message.startswith(f"model {MODEL} is gated") and "HTTP 403" in message
    assert hub_problem(ValueError("config.json is not valid JSON"), "models/x") is None
    assert load_problem(ValueError("unrelated"), "models/x") is None


def test_cuda_out_of_memory_while_loading_names_the_gpu_and_the_fix():
    import torch

    real = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 112.00 MiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 20.56 MiB is free. Process 4242 has 79.16 GiB memory in use. Of the "
        "allocated memory 78.50 GiB is allocated by PyTorch")
    message = oom_problem(real, str(tiny_model_dir()), load_in_4bit=True)
    assert message.startswith(f"out of GPU memory while loading {tiny_model_dir()} in 4-bit "
                              "(GPU 0: 20.56 MiB free of 79.19 GiB; the weights alone need about")
    assert "nvidia-smi" in message and "CUDA_VISIBLE_DEVICES" in message
    assert "full" not in message and "disk" not in message  # not mistaken for a full disk
    bf16 = oom_problem(real, "some/hub-model", load_in_4bit=False)
    assert "in bf16" in bf16 and "add --load-in-4bit" in bf16
    # bitsandbytes / raw CUDA kernels: RuntimeError("CUDA error: out of memory")
    kernel = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                          "reported at some other API call")
    assert oom_problem(kernel, "m", True).startswith("out of GPU memory while loading m in 4-bit")
    assert oom_problem(RuntimeError("shape mismatch"), "m", True) is None


# torch's own texts (c10/cuda/CUDAFunctions.cpp and the CUDA runtime's error string)
DRIVER_TOO_OLD = (
    "The NVIDIA driver on your system is too old (found version 12080). Please update your GPU "
    "driver by downloading and installing a new version from the URL: "
    "http://www.nvidia.com/Download/index.aspx Alternatively, go to: https://pytorch.org to "
    "install a PyTorch version that has been compiled with your version of the CUDA driver.")
INSUFFICIENT = "CUDA driver version is insufficient for CUDA runtime version"


def test_old_driver_is_named_with_the_versions_and_the_fix():
    # the RuntimeError torch.cuda.init() raises, and the same text in is_available()'s warning
    for text in (str(RuntimeError(DRIVER_TOO_OLD)),
                 f"CUDA initialization: {DRIVER_TOO_OLD} (Triggered internally at "
                 "/pytorch/c10/cuda/CUDAFunctions.cpp:119.)"):
        message = cuda_init_problem(text, "2.11.0+cu130", "13.0", driver="570.133.20")
        assert message == (
            "the NVIDIA driver is too old for this torch (driver 570.133.20, supports CUDA up to "
            "12.8; torch 2.11.0+cu130 is built for CUDA 13.0): update the NVIDIA driver to 580 "
            "or newer (CUDA 13.x), or install a torch build for CUDA 12.8 or older")
    message = cuda_init_problem(f"CUDA error: {INSUFFICIENT}", "2.13.0+cu130", "13.0")
    assert message.startswith("the NVIDIA driver is too old for this torch (cudaErrorInsuffic")
    assert "580 or newer" in message
    assert cuda_init_problem("Found no NVIDIA driver on your system.", "2.13.0", "13.0") is None


def test_cpu_only_torch_keeps_the_no_gpu_messages():
    """On a CPU-only torch build (this machine) nothing is reported as a driver problem, so
    the existing "needs a CUDA GPU" lines stay byte-identical (docs/bad-inputs.md)."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch")
    assert cuda_unavailable_problem() is None

    from integrations.recipe_guard.checks import check_cuda

    assert check_cuda({"load_in_4bit": True, "bf16": True}, "r.yml") == [
        "r.yml: needs an NVIDIA GPU (load_in_4bit, bf16) but CUDA is not available here; on a "
        "CPU run `make demo` or `axolotl train recipes/tiny-mistral-cpu.yml`"]


@pytest.mark.gpu
def test_cuda_out_of_memory_while_loading_in_4bit_is_one_line(tmp_path, capsys):
    """A real out-of-memory through the loader: this process may use only 32 MiB more GPU
    memory than it holds (torch's per-process limit, so other processes on the GPU are not
    disturbed), then a 200 M-parameter model is loaded in 4-bit (its 16-bit embeddings alone
    are 65 MB)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from eval.perplexity import main

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model_dir = tmp_path / "model"
    config = MistralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    tiny = tiny_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (tiny / name).is_file():
            (model_dir / name).write_bytes((tiny / name).read_bytes())
    data = write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    limit = (torch.cuda.memory_reserved(0) + 32 * 2**20) / total
    torch.cuda.set_per_process_memory_fraction(limit, 0)
    try:
        code = main(["--model", str(model_dir), "--load-in-4bit", "--data", str(data),
                     "--out", str(tmp_path / "out"), "--no-progress"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    # (the loader's progress bar may have started on stderr before the failure)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: out of GPU memory while loading {model_dir} in 4-bit "
                                "("), errors[0]
    assert "CUDA_VISIBLE_DEVICES" in errors[0]
