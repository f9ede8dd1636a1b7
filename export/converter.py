"""llama.cpp's HF -> GGUF converter, taken from the llama-cpp-python source distribution.

llama.cpp does not publish `convert_hf_to_gguf.py` as a package of its own, but the
llama-cpp-python sdist on PyPI vendors the whole llama.cpp tree. We extract the converter, its
`conversion/` package and its own `gguf-py` (the converter puts that copy first on sys.path, so
the version it was written against is the one used) into `.cache/llama.cpp-<version>/`, once.

Where the sdist comes from, first match wins:
  1. `.cache/llama_cpp_python-<version>.tar.gz` (`make setup-export` downloads it there and
     builds the llama.cpp runtime from the same file)
  2. `pip download --no-binary :all: --no-deps llama-cpp-python==<version>` (the package index)

`python -m export.converter` fetches it ahead of time and prints the converter's path.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from core.errors import UserError, cli
from core.files import staged_dir
from core.launch import CODE_ROOT
from export import LLAMA_CPP_PYTHON_VERSION

CACHE = CODE_ROOT / ".cache"
SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs from vendor/llama.cpp/ (plus the licence it ships under).
MEMBERS = (SCRIPT, "conversion/", "gguf-py/gguf/", "LICENSE")


def sdist_name(version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    return f"llama_cpp_python-{version}.tar.gz"


def converter_dir(version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path = CACHE) -> Path:
    return cache / f"llama.cpp-{version}"


def download_sdist(version: str, dest: Path) -> Path:
    """The sdist from the package index via pip (pip's own cache and settings apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
           "--no-deps", "--dest", str(dest), f"llama-cpp-python=={version}"]
    print(f"export: downloading llama.cpp's converter: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / sdist_name(version)
    if proc.returncode != 0 or not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download llama-cpp-python=={version} from the package "
                             f"index ({last}); put {sdist_name(version)} into {CACHE}/ or pass "
                             "--converter PATH/convert_hf_to_gguf.py")
    return path


def extract(sdist: Path, target: Path, version: str) -> Path:
    """Unpack the converter's files from the sdist into `target` (atomically)."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with staged_dir(target) as staging, tarfile.open(sdist) as tar:
        wanted = [m for m in tar.getmembers() if m.name.startswith(prefix)
                  and (m.isfile() or m.isdir())
                  and any(m.name[len(prefix):].startswith(w) for w in MEMBERS)]
        if not any(m.name == prefix + SCRIPT for m in wanted):
            raise UserError(f"{sdist} holds no {prefix}{SCRIPT}: is it the "
                            f"llama-cpp-python {version} source distribution?")
        for member in wanted:
            member.name = member.name[len(prefix):]
        tar.extractall(staging, members=wanted, filter="data")
    return target / SCRIPT


def find_converter(explicit: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION,
                   cache: Path = CACHE) -> Path:
    """Path of convert_hf_to_gguf.py, fetched and unpacked on first use."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise UserError(f"converter {explicit} not found: pass the path of llama.cpp's "
                                 f"{SCRIPT} or leave --converter out to fetch it")
        return Path(explicit)
    script = converter_dir(version, cache) / SCRIPT
    if script.is_file():
        return script
    sdist = cache / sdist_name(version)
    if sdist.is_file():
        return extract(sdist, converter_dir(version, cache), version)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as tmp:
        return extract(download_sdist(version, Path(tmp)), converter_dir(version, cache), version)


def run_main(argv=None) -> None:
    del argv
    try:
        print(find_converter())
    except (OSError, tarfile.TarError) as exc:
        raise UserError(str(exc)) from None


main = cli(run_main, prog="export.converter")


if __name__ == "__main__":
    raise SystemExit(main())
