"""Fail fast, in one line, when the container cannot see the NVIDIA GPUs a job needs.

Usage:
    python docker/check_gpu.py                 # needs at least 1 GPU
    python docker/check_gpu.py --min-gpus 4    # needs at least 4 (GPU_COUNT=4)
    python docker/check_gpu.py --min-gpus all  # needs at least 1 (GPU_COUNT=all)

docker/entrypoint.sh runs this before `axolotl train`, the eval scripts and `merge-lora` when
REQUIRE_GPUS is set, so a box without a usable GPU stops here with one line that says what to do
instead of a CUDA stack trace minutes later. Exit status: 0 when enough GPUs are visible (one
line naming them on stdout), 2 for a bad --min-gpus value, 3 when too few GPUs are visible.
"""

from __future__ import annotations

import argparse
import sys
import warnings

TOOLKIT_URL = (
    "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
)
EXIT_BAD_ARGUMENT = 2
EXIT_NO_GPU = 3


def parse_min_gpus(value: str) -> int:
    """GPU_COUNT as compose takes it: a positive number, or `all` (at least one)."""
    text = value.strip().lower()
    if text == "all":
        return 1
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--min-gpus/GPU_COUNT={value!r}: use a whole number >= 1 or 'all'")


def visible_gpus() -> tuple[list[str], str]:
    """Names of the CUDA devices torch can see, and a note when torch itself cannot use CUDA."""
    try:
        import torch
    except ImportError as exc:
        return [], f"torch cannot be imported ({exc})"
    if torch.version.cuda is None:
        return [], f"this Python's torch {torch.__version__} is a CPU-only build"
    with warnings.catch_warnings():
        # Without a driver torch warns "CUDA initialization: ..." on stderr: we say it better.
        warnings.simplefilter("ignore")
        if not torch.cuda.is_available():
            return [], ""
        count = torch.cuda.device_count()
        return [torch.cuda.get_device_name(i) for i in range(count)], ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-gpus", default="1", help="a number >= 1, or 'all' (default 1)")
    args = parser.parse_args(argv)
    try:
        needed = parse_min_gpus(args.min_gpus)
    except ValueError as exc:
        print(f"check_gpu: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT

    names, note = visible_gpus()
    if not names:
        detail = f" ({note})" if note else ""
        print(
            f"check_gpu: no NVIDIA GPU visible in the container{detail}: install the NVIDIA "
            f"driver and the NVIDIA Container Toolkit ({TOOLKIT_URL}) and start the service "
            "with `docker compose up train` (it reserves the GPUs), or run `make demo` for the "
            "CPU demo",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    if len(names) < needed:
        print(
            f"check_gpu: {len(names)} NVIDIA GPU(s) visible in the container but {needed} "
            f"needed (GPU_COUNT={args.min_gpus}): lower GPU_COUNT or free the busy GPUs",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    print(f"check_gpu: {len(names)} NVIDIA GPU(s) visible: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
