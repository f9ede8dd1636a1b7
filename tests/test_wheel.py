"""The wheel installs and works: `pip install .` (not editable) ships every package the recipes need.

The wheel is built from a copy of the checkout (the files git tracks or does not ignore, as a
clone has them) and installed, without its dependencies, into a fresh virtual environment that
sees the dependencies already installed here (their site-packages on its path). Then, from a
folder outside the checkout and without PYTHONPATH, every plugin the recipes name and every
package of integrations/ import from that environment's copy, and Axolotl's config validation
accepts the demo recipe with the plugins' own options merged into its schema (and rejects a bad
value of one). An editable install or Docker's PYTHONPATH would hide a package missing from the
wheel; this test cannot.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml
from conftest import REPO

DEMO_RECIPE = REPO / "recipes" / "smollm2-demo-cpu.yml"

# Runs inside the fresh environment: what it imports from where, and the validation's answer.
PROBE = r"""
import importlib, json, sys
import torch
from axolotl.integrations.base import PluginManager
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
from pydantic import ValidationError

request = json.loads(sys.argv[1])
found = {}
for name in request["plugins"]:
    module_name, attribute = name.rsplit(".", 1)
    module = importlib.import_module(module_name)
    getattr(module, attribute)
    found[name] = module.__file__
for name in request["packages"]:
    found[name] = importlib.import_module(name).__file__
for name in request["recipe"].get("plugins") or []:
    PluginManager.get_instance().register(name)
cpu = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": None}
env = {"torch_version": torch.__version__.split("+")[0]}
validated = validate_config(DictDefault(request["recipe"]), capabilities=cpu,
                            env_capabilities=env)
try:
    validate_config(DictDefault({**request["recipe"], "bf16_autocast": "sometimes"}),
                    capabilities=cpu, env_capabilities=env)
    refused = None
except ValidationError as err:
    refused = [".".join(map(str, e["loc"])) for e in err.errors()]
print(json.dumps({"files": found, "validated": {k: str(v) for k, v in validated.items()},
                  "refused": refused}))
"""


def recipe_plugins() -> list[str]:
    names = set()
    for recipe in sorted((REPO / "recipes").glob("*.yml")):
        names.update(yaml.safe_load(recipe.read_text()).get("plugins") or [])
    return sorted(names)


def integration_packages() -> list[str]:
    return sorted(f"integrations.{p.parent.name}" for p in (REPO / "integrations").glob(
        "*/__init__.py"))


def copy_of_the_checkout(target: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def fresh_environment(root: Path, wheel: Path) -> Path:
    """A new virtual environment holding the wheel, with this one's packages on its path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    python = root / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                   "['purelib'])"], capture_output=True, text=True,
                                  check=True).stdout.strip())
    here = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (purelib / "dependencies-installed-here.pth").write_text(
        "".join(f"{path}\n" for path in dict.fromkeys(here)))
    # Without PYTHONPATH (the tests put the checkout there, and with it the editable install's
    # metadata), and --ignore-installed: else this checkout counts as "already satisfied" and
    # the wheel is not installed at all.
    env = without_pythonpath()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", "--ignore-installed", str(wheel)], check=True,
                   timeout=300, cwd=root, env=env)
    installed = subprocess.run([python, "-c", "import importlib.metadata as m; "
                                "print(m.distribution('frankenstein-qlora').locate_file(''))"],
                               capture_output=True, text=True, check=True, cwd=root,
                               env=env).stdout
    assert Path(installed.strip()).is_relative_to(root), installed  # the wheel's, not ours
    return python


def test_the_wheel_ships_every_plugin_and_the_demo_recipe_validates(tmp_path):
    source = copy_of_the_checkout(tmp_path / "clone")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(source)], check=True,
                   timeout=300)
    (wheel,) = dist.glob("*.whl")
    python = fresh_environment(tmp_path / "venv", wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    request = {"plugins": recipe_plugins(), "packages": integration_packages(),
               "recipe": yaml.safe_load(DEMO_RECIPE.read_text())}
    env = without_pythonpath()
    proc = subprocess.run([python, "-c", PROBE, json.dumps(request)], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "integrations.passage_start" in result["files"]  # once left out of the wheel
    assert "integrations.bf16_autocast.Bf16AutocastPlugin" in result["files"]
    installed = python.parent.parent
    for name, file in result["files"].items():
        if not name.startswith("axolotl."):  # ours: from the wheel, not from the checkout
            assert Path(file).is_relative_to(installed), (name, file)
    # the plugins' options are part of the schema: their defaults filled in, a bad value refused
    assert result["validated"]["bf16_autocast"] == "auto"
    assert result["validated"]["recipe_guard_finite_loss"] == "True"
    assert result["refused"] and any("bf16_autocast" in loc for loc in result["refused"])
