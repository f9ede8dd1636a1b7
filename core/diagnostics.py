"""One-line, true messages for what goes wrong on the GPU path, shared by training and evaluation.

- Hugging Face hub refusals while fetching a model: a gated model whose terms the account has not
  accepted (or no token at all), an invalid token, a token without the permission, a model id
  that does not exist, no network.
- CUDA out of memory while the weights are loaded (in 4-bit or not).
- CUDA that cannot start: an NVIDIA driver too old for the CUDA version torch was built for,
  no driver, every GPU hidden by CUDA_VISIBLE_DEVICES.

Each `*_problem` function returns a message, or None when the failure is not of its kind (the
caller then keeps its own message). They read real exception objects (and their `__cause__`
chain: transformers wraps huggingface_hub's errors in an OSError) or the error text torch
prints, so they can be checked on a machine without a GPU or a network. Used by the evaluation
(eval/common.py), the recipe guard's CUDA check (integrations/recipe_guard/checks.py) and
gpu-check's choice of model; torch and huggingface_hub are imported only inside the functions.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from core.errors import exception_chain, first_line

HUB = "https://huggingface.co"
TOKENS_PAGE = f"{HUB}/settings/tokens"
# The oldest Linux driver that runs each CUDA major version (NVIDIA's CUDA release notes,
# "minor version compatibility").
MIN_DRIVER_FOR_CUDA = {"13": "580", "12": "525", "11": "450"}

_DRIVER_TOO_OLD = re.compile(r"NVIDIA driver on your system is too old \(found version (\d+)\)")
_INSUFFICIENT_DRIVER = re.compile(
    r"cudaErrorInsufficientDriver|CUDA_ERROR_INSUFFICIENT_DRIVER|"
    r"CUDA driver version is insufficient for CUDA runtime version", re.IGNORECASE)
_NO_DRIVER = re.compile(r"Found no NVIDIA driver on your system|cudaErrorNoDevice|"
                        r"no CUDA-capable device is detected", re.IGNORECASE)
_OOM_DETAIL = re.compile(r"GPU (\d+) has a total capacity of ([\d.]+ \wiB) of which "
                         r"([\d.]+ \wiB) is free")
_OOM_TEXT = re.compile(r"out of memory", re.IGNORECASE)


def _token_set() -> bool:
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))


def _status(err) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


# --------------------------------------------------------------------------- the hub


def hub_problem(err: BaseException, model: str) -> str | None:
    """The hub refused or could not be reached while fetching `model`; None otherwise."""
    try:
        from huggingface_hub import errors as hub
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return None
    page = f"{HUB}/{model}"
    local = "pass --model with a local copy"
    for e in exception_chain(err):
        if isinstance(e, hub.GatedRepoError):
            if not _token_set():
                return (f"model {model} is gated on the Hugging Face hub and no token is set "
                        f"(HTTP {_status(e) or 401}): accept its terms at {page}, create a read "
                        f"token at {TOKENS_PAGE}, `export HF_TOKEN=...` and re-run (or {local})")
            return (f"model {model} is gated on the Hugging Face hub and the account of HF_TOKEN "
                    f"has no access to it (HTTP {_status(e) or 403}): accept its terms at {page} "
                    f"while logged in as that account (a fine-grained token also needs \"read "
                    f"access to public gated repos\"), then re-run (or {local})")
        if isinstance(e, hub.RepositoryNotFoundError):
            who = "with HF_TOKEN" if _token_set() else "without a token (HF_TOKEN is not set)"
            return (f"model {model} was not found on the Hugging Face hub {who} (HTTP "
                    f"{_status(e) or 404}): check the id, or for a private model set HF_TOKEN of "
                    f"an account that can read it (or {local})")
        if isinstance(e, hub.HfHubHTTPError) and _status(e) == 401:
            return (f"the Hugging Face hub rejected HF_TOKEN while fetching {model} (HTTP 401: "
                    f"invalid or expired token): create a new read token at {TOKENS_PAGE} and "
                    f"`export HF_TOKEN=...` (or {local})")
        if isinstance(e, hub.HfHubHTTPError) and _status(e) == 403:
            return (f"HF_TOKEN may not read {model} (HTTP 403 Forbidden): give the token read "
                    f"access (a fine-grained token needs \"read access to public gated repos\" "
                    f"for gated models) at {TOKENS_PAGE} (or {local})")
        if isinstance(e, hub.OfflineModeIsEnabled | hub.LocalEntryNotFoundError):
            return (f"model {model} is not in the local Hugging Face cache and the hub cannot be "
                    f"used (offline or unreachable): connect and unset HF_HUB_OFFLINE to download "
                    f"it once, or {local}")
    text = str(err)
    if "You are trying to access a gated repo" in text:  # transformers' wording, chain lost
        return (f"model {model} is gated on the Hugging Face hub: accept its terms at {page}, "
                f"`export HF_TOKEN=...` of that account and re-run (or {local})")
    return None


# --------------------------------------------------------------------------- GPU memory


def oom_problem(err: BaseException, model: str, load_in_4bit: bool) -> str | None:
    """CUDA ran out of memory while `model` was being loaded; None for any other error."""
    oom = next((e for e in exception_chain(err) if _is_oom(e)), None)
    if oom is None:
        return None
    how = "in 4-bit" if load_in_4bit else "in bf16"
    detail = _OOM_DETAIL.search(str(oom))
    where = (f"GPU {detail[1]}: {detail[3]} free of {detail[2]}" if detail
             else first_line(oom, 200))
    need = weights_size_gib(model, load_in_4bit)
    needs = f"; the weights alone need about {need:.1f} GiB {how}" if need else ""
    fix = ("free that GPU (`nvidia-smi` lists the processes holding memory) or pick an idle one "
           "with CUDA_VISIBLE_DEVICES=N")
    if not load_in_4bit:
        fix += ", or add --load-in-4bit (about a third of the memory)"
    return f"out of GPU memory while loading {model} {how} ({where}{needs}): {fix}"


def _is_oom(err: BaseException) -> bool:
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    # bitsandbytes and raw CUDA kernels report "CUDA error: out of memory" as RuntimeError
    return isinstance(err, RuntimeError) and bool(_OOM_TEXT.search(str(err)))


def weights_size_gib(model: str, load_in_4bit: bool) -> float | None:
    """Rough memory of a local model's weights: the safetensors size (bf16), or ~0.3 of it in
    4-bit (nf4 packs two weights a byte; embeddings, norms and lm_head stay 16-bit)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    if not size:
        return None
    return size * (0.3 if load_in_4bit else 1.0) / 2**30


def load_problem(err: BaseException, model: str, load_in_4bit: bool = False) -> str | None:
    """The specific message for a failed tokenizer/model load, or None (keep the generic one)."""
    return hub_problem(err, model) or oom_problem(err, model, load_in_4bit)


# --------------------------------------------------------------------------- CUDA start-up


def cuda_init_problem(message: str, torch_version: str, torch_cuda: str | None,
                      driver: str | None = None) -> str | None:
    """What to do about a CUDA initialisation error text (torch's RuntimeError or its
    "CUDA initialization: ..." warning); None when it is not a driver problem."""
    built_for = f"torch {torch_version} is built for CUDA {torch_cuda}" if torch_cuda else (
        f"torch {torch_version}")
    major = (torch_cuda or "").split(".")[0]
    needed = MIN_DRIVER_FOR_CUDA.get(major)
    update = (f"update the NVIDIA driver to {needed} or newer (CUDA {major}.x)" if needed
              else "update the NVIDIA driver")
    installed = f"driver {driver}, " if driver else ""
    too_old = _DRIVER_TOO_OLD.search(message)
    if too_old:
        found = int(too_old[1])
        supports = f"{found // 1000}.{(found % 1000) // 10}"
        return (f"the NVIDIA driver is too old for this torch ({installed}supports CUDA up to "
                f"{supports}; {built_for}): {update}, or install a torch build for CUDA "
                f"{supports} or older")
    if _INSUFFICIENT_DRIVER.search(message):
        return (f"the NVIDIA driver is too old for this torch ({installed}cudaErrorInsufficient"
                f"Driver; {built_for}): {update}, or install a torch build for the CUDA version "
                "`nvidia-smi` shows")
    return None


def nvidia_driver_version() -> str | None:
    """The installed driver's version from nvidia-smi, or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def cuda_unavailable_problem() -> str | None:
    """Why CUDA cannot be used by this process although torch was built with it: the driver is
    too old, or CUDA_VISIBLE_DEVICES hides every GPU. None when CUDA works, for a CPU-only torch
    build, and when no NVIDIA driver/GPU is present (callers keep their "no GPU" message)."""
    import torch

    if torch.version.cuda is None or torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as err:  # noqa: BLE001 - any init failure is classified below
        message = str(err)
    else:  # pragma: no cover - available after all
        return None
    if _NO_DRIVER.search(message):
        return None
    problem = cuda_init_problem(message, torch.__version__, torch.version.cuda,
                                nvidia_driver_version())
    if problem:
        return problem
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and "No CUDA GPUs are available" in message:
        return (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU: unset it or name a GPU "
                "index that `nvidia-smi -L` lists")
    first = (message.strip().splitlines() or ["unknown error"])[0][:200]
    return f"CUDA cannot start ({first}): check `nvidia-smi` and the driver"
