"""One way to launch Axolotl's commands (train, merge-lora, preprocess), in one environment.

Everything that starts Axolotl uses it: the demo, gpu-check, the benchmark runners, the demo
sweep and the tests.

    argv = axolotl_command("train", recipe)                   # the command line
    subprocess.run(argv, env=environment(), cwd=CODE_ROOT)    # the environment it runs in

Launchers (`launcher=`):
    axolotl     `axolotl VERB RECIPE`, what users type (for train it re-launches itself through
                the `accelerate` command)
    python      `python -m axolotl.cli.VERB RECIPE`: one process, no launcher (for packages
                installed without their commands, e.g. with pip --target)
    torchrun    `python -m torch.distributed.run --standalone --nproc_per_node N -m ...`
    accelerate  `python -m accelerate.commands.launch --num_processes N -m ...` (as `axolotl
                train --launcher accelerate` does, without an accelerate config)
    auto        axolotl where both the axolotl and the accelerate commands exist, else python

The environment (`environment()`), on top of the caller's:
    HF_HUB_OFFLINE=1        unless set: nothing here needs the hub (`hub=True` leaves it as it
                            is, for a command that may download a model)
    AXOLOTL_DO_NOT_TRACK=1  Axolotl sends telemetry otherwise
    TOKENIZERS_PARALLELISM=false unless set (its fork warning, and threads nobody uses)
    OMP_NUM_THREADS         unless set: this machine's CPUs shared by the processes launched;
                            accelerate sets 1 when it is unset, which halves CPU training speed
                            on 2 cores
    PATH                    this Python's bin/ first: `axolotl train` execs `accelerate`
    PYTHONPATH              this code's root first, so every process runs the same code (the
                            recipes' plugins are ours)
    PYTHONUNBUFFERED=1      logs written as they happen
    PYTORCH_ALLOC_CONF=expandable_segments:True unless either allocator variable is set: what
                            the `axolotl` command sets for every verb, so `python -m
                            axolotl.cli.VERB` and the launchers allocate GPU memory as it does
                            (`axolotl_allocator=False`: not set, for programs not Axolotl's)
    NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1
                            multicast NVLink can take a shared host's GPUs out of service

`stop_group` ends a launched command with all its processes (launchers, workers): commands are
started in their own session (`start_new_session=True`) so that one signal reaches them all.
`run_logged` runs one that way into a log file, with a time limit; a SIGTERM to the caller
stops it too.

Standard library only, like the rest of core/.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

CODE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, or site-packages of a wheel
LAUNCHERS = ("auto", "axolotl", "python", "torchrun", "accelerate")
MODULES = {"train": "axolotl.cli.train", "merge-lora": "axolotl.cli.merge_lora",
           "preprocess": "axolotl.cli.preprocess"}
MULTI_GPU_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}
KILL_GRACE_S = 60
AXOLOTL_ALLOC_CONF = "expandable_segments:True"  # axolotl.utils.set_pytorch_cuda_alloc_conf
ALLOC_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9 name, the old


def bin_dir() -> Path:
    """The folder of this Python's commands (a virtual environment's bin/)."""
    return Path(sys.executable).parent


def command_path(name: str) -> str | None:
    """A command of this Python's environment, else one on PATH, else None."""
    own = bin_dir() / name
    return str(own) if own.is_file() else shutil.which(name)


def shown(argv: list[str]) -> str:
    """A command as logs and summaries print it: this Python's own commands by their names
    (`python`, `axolotl`), paths inside the checkout relative to it, so that a log reads the same
    on every machine and names no folder of the one it ran on."""
    words = []
    for word in map(str, argv):
        path = Path(word)
        if word == sys.executable:
            word = "python"
        elif path.is_absolute() and path.parent == bin_dir():
            word = path.name
        elif path.is_absolute() and path.is_relative_to(CODE_ROOT):
            word = str(path.relative_to(CODE_ROOT))
        words.append(word)
    return shlex.join(words)


def resolve_launcher(launcher: str = "auto") -> str:
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}: choose from {', '.join(LAUNCHERS)}")
    if launcher == "auto":
        commands = command_path("axolotl") and command_path("accelerate")
        return "axolotl" if commands else "python"
    return launcher


def axolotl_command(verb: str, recipe: Path | str, *args: str, launcher: str = "auto",
                    processes: int = 1) -> list[str]:
    """The argv of `axolotl VERB RECIPE ARGS` through `launcher` (see the module docstring);
    `processes` is the number of processes torchrun or accelerate start."""
    module = MODULES[verb]
    launcher = resolve_launcher(launcher)
    tail = [str(recipe), *map(str, args)]
    if launcher == "axolotl":
        return [command_path("axolotl") or "axolotl", verb, *tail]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(processes), "-m", module, *tail]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
                str(processes), "-m", module, *tail]
    return [sys.executable, "-m", module, *tail]


def _prepend(path: str, value: str | None) -> str:
    parts = [p for p in (value or "").split(os.pathsep) if p and p != path]
    return os.pathsep.join([path, *parts])


def environment(base: Mapping[str, str] | None = None, *, hub: bool = False,
                processes: int = 1, axolotl_allocator: bool = True,
                **extra: str) -> dict[str, str]:
    """The environment Axolotl's commands run in (see the module docstring): `base` (default:
    this process's) with the project's settings, then `extra` (e.g. CUDA_VISIBLE_DEVICES).
    `axolotl_allocator=False` for a program that is not Axolotl's (the bench's peers), which
    allocates GPU memory as it would on its own."""
    env = dict(os.environ if base is None else base)
    if not hub:
        env.setdefault("HF_HUB_OFFLINE", "1")
    env["AXOLOTL_DO_NOT_TRACK"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, processes))))
    env["PATH"] = _prepend(str(bin_dir()), env.get("PATH"))
    env["PYTHONPATH"] = _prepend(str(CODE_ROOT), env.get("PYTHONPATH"))
    env["PYTHONUNBUFFERED"] = "1"
    if axolotl_allocator and not any(name in env for name in ALLOC_VARIABLES):
        env["PYTORCH_ALLOC_CONF"] = AXOLOTL_ALLOC_CONF
    env.update(MULTI_GPU_SAFETY)
    env.update({key: str(value) for key, value in extra.items()})
    return env


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM,
               grace_s: float = KILL_GRACE_S) -> int:
    """Send `sig` to the process group of `proc` and wait for it; SIGKILL to the group when it
    is still running after `grace_s`. Its exit status."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


class _Terminated(Exception):
    """This process got a SIGTERM while it waited for a command."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """In the main thread, a SIGTERM raises _Terminated inside the block (elsewhere signals
    cannot be handled: the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_logged(argv: list[str], log: Path, env: Mapping[str, str], *,
               timeout_s: float | None = None, grace_s: float = 10, cwd: Path = CODE_ROOT,
               mode: str = "w") -> tuple[int, bool]:
    """`argv` in its own session, stdout and stderr into `log` (opened with `mode`), stopped
    with its whole process group after `timeout_s` (SIGTERM, then SIGKILL after `grace_s`):
    (exit status, timed out). A SIGTERM to this process (`timeout`, a scheduler), which its own
    session no longer passes on, stops the command the same way, then this process (exit 143)."""
    with open(log, mode) as handle:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with _sigterm_raises():
                return proc.wait(timeout=None if timeout_s is None else max(timeout_s, 1)), False
        except subprocess.TimeoutExpired:
            return stop_group(proc, signal.SIGTERM, grace_s), True
        except _Terminated:
            stop_group(proc, signal.SIGTERM, grace_s)
            raise SystemExit(128 + signal.SIGTERM) from None
        finally:
            if proc.poll() is None:
                stop_group(proc, signal.SIGKILL, grace_s)
