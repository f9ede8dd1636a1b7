"""python -m export.serve: llama.cpp's OpenAI-compatible server on the exported demo GGUF.

The server is started as a real subprocess on a free port, on the q8_0 GGUF that
`python -m export` wrote for the shortened demo run (conftest's demo_export, shared with
test_export); its greedy /v1/completions answer must equal llama.cpp's own continuation of the
same prompt in this process (llama-cpp-python's Llama on the same file). Bad inputs are one line
each, before anything starts.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

PROMPT = "It was on a dreary night of November that"
# Plain greedy: the server's default repeat_penalty is 1.1, even at temperature 0.
GREEDY = {"max_tokens": 24, "temperature": 0.0, "repeat_penalty": 1.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.serve", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("serve: error: "), proc.stderr[-3000:]
    return lines[0]


# --- bad inputs -----------------------------------------------------------------------------


def test_missing_run_or_export_is_one_line(tmp_path):
    run = tmp_path / "run"
    line = one_error_line(serve(run))
    assert line.startswith(f"serve: error: run directory {run} not found: "), line
    run.mkdir()
    line = one_error_line(serve(run))
    assert line == (f"serve: error: {run}/export/run-q8_0.gguf not found: export the run first "
                    f"(make export, or python -m export {run})")
    line = one_error_line(serve(run, "--type", "q4_k_m"))
    assert line.endswith(f"(make export, or python -m export {run} --types f16,q4_k_m)"), line


def test_port_in_use_is_one_line(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make "
                        "setup-export` (make test runs it)")
    gguf = tmp_path / "run" / "export" / "run-q8_0.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")  # never loaded: the port is checked first
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(serve(tmp_path / "run", "--port", port))
    assert line == (f"serve: error: port {port} on 127.0.0.1 is in use (another server, or the "
                    f"server already running): stop it, or pass --port N (e.g. --port "
                    f"{port + 1})")


# --- the server for real --------------------------------------------------------------------


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the server did not start (exit {proc.poll()}):\n"
                                     + log.read_text(errors="replace")[-4000:]) from None
            time.sleep(0.5)


@pytest.mark.slow
def test_server_answers_like_llama_cpp_in_process(demo_export, tmp_path):
    assert demo_export.returncode == 0, demo_export.log.read_text()[-4000:]
    run_dir, port, log = demo_export.run_dir, free_port(), tmp_path / "serve.log"
    gguf = demo_export.out / f"{demo_export.name}-q8_0.gguf"
    name = run_dir.name  # served under the run's name
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "export.serve", str(run_dir), "--port",
                                 str(port)], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    try:
        models = wait_for(f"http://127.0.0.1:{port}/v1/models", proc, log)
        started = time.perf_counter() - start
        answer = post(f"http://127.0.0.1:{port}/v1/completions",
                      {"model": name, "prompt": PROMPT, **GREEDY})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    printed = log.read_text()
    assert f"serve: $ python -m llama_cpp.server --model {gguf} --model_alias {name} --host " \
           f"127.0.0.1 --port {port}" in printed, printed[:2000]
    assert [m["id"] for m in models["data"]] == [name]
    assert answer["model"] == name and answer["object"] == "text_completion"

    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, verbose=False)
    local = llm.create_completion(PROMPT, **GREEDY)
    llm.close()
    text = answer["choices"][0]["text"]
    assert text.strip(), answer
    assert text == local["choices"][0]["text"], (text, local)
    assert answer["usage"] == local["usage"], (answer["usage"], local["usage"])
    print(f"server up in {started:.1f} s; {answer['usage']}")
