"""Which base model gpu-check trains, and how it gets it.

`choose_model` answers (reference, kind, why): kind `given` (--model DIR, or the recipe's
base_model when it is a local directory), `hub` (mistralai/Mistral-7B-v0.1 when HF_TOKEN is set
and the hub grants access; downloaded once) or `random-init` (a model of its exact shape built by
bench.build_random_mistral: compute and memory do not depend on the weight values).
`untrained_reason` tells a given model that is not pretrained (it is then trained as a built one
is: without the recipe's loss watchdog, which is set for real weights).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

from core.diagnostics import hub_problem
from core.errors import first_line
from core.launch import CODE_ROOT

HUB_MODEL = "mistralai/Mistral-7B-v0.1"
DEFAULT_RANDOM_MODEL = Path("models/mistral-7b-random")
RANDOM_INIT = "a random-init model of Mistral-7B-v0.1's exact shape"


def choose_model(model: str, recipe_cfg: dict) -> tuple[str, str, str]:
    """(reference, kind, note) for --model `model` ("auto" or a directory or hub id)."""
    if model != "auto":
        path = Path(model)
        local = (CODE_ROOT / path) if not path.is_absolute() else path
        if local.is_dir():
            return str(local.resolve()), "given", f"--model {model}"
        return model, "hub", f"--model {model}"
    base = str(recipe_cfg.get("base_model", ""))
    if base and (CODE_ROOT / base).is_dir():
        return str((CODE_ROOT / base).resolve()), "given", "the recipe's local base_model"
    token = os.environ.get("HF_TOKEN")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not token:
        return "", "random-init", f"no HF_TOKEN: {RANDOM_INIT}"
    if offline:
        return "", "random-init", f"HF_TOKEN is set but HF_HUB_OFFLINE=1: {RANDOM_INIT}"
    try:
        from huggingface_hub import auth_check

        auth_check(HUB_MODEL)
    except Exception as err:  # noqa: BLE001 - any hub failure: say why, use the random one
        reason = hub_problem(err, HUB_MODEL) or first_line(err, 200)
        return "", "random-init", f"HF_TOKEN is set but the hub refused: {reason}"
    return HUB_MODEL, "hub", f"{HUB_MODEL} from the Hugging Face hub (HF_TOKEN)"


def build_command(out: Path, tokenizer_from: Path | None, on_gpu: bool) -> list[str]:
    """The random-init model's build (tiny and in fp32 on a machine without a GPU)."""
    cmd = [sys.executable, "-m", "bench.build_random_mistral", "--out", str(out)]
    if tokenizer_from:
        cmd += ["--tokenizer-from", str(tokenizer_from)]
    if not on_gpu:
        cmd += ["--tiny", "--device", "cpu", "--dtype", "float32"]
    return cmd


def download_command(ref: str) -> list[str]:
    """The hub model's weights, config and tokenizer into the Hugging Face cache."""
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download(sys.argv[1], allow_patterns=['*.json', "
            "'*.safetensors', 'tokenizer.model']))")
    return [sys.executable, "-c", code, ref]


def untrained_reason(model_dir: Path) -> str | None:
    """Why a model directory looks like a random-init (not pretrained) model, or None: every
    norm weight in its safetensors is exactly 1.0, as transformers initialises them and no
    trained model keeps them. Reads only those small tensors, from the files' headers."""
    ones = {"F32": struct.pack("<f", 1.0), "BF16": b"\x80\x3f", "F16": struct.pack("<e", 1.0)}
    seen = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                size = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(size))
                for name, info in header.items():
                    if not name.endswith("norm.weight") or info.get("dtype") not in ones:
                        continue
                    start, end = info["data_offsets"]
                    handle.seek(8 + size + start)
                    one = ones[info["dtype"]]
                    if handle.read(end - start) != one * ((end - start) // len(one)):
                        return None
                    seen += 1
        except (OSError, ValueError, KeyError, struct.error):
            return None
    return f"all {seen} norm weights are 1.0, as initialised" if seen else None
