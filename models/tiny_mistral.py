"""Build a tiny random-init MistralForCausalLM with the real Mistral-7B-v0.1 tokenizer.

Usage:
    python -m models.tiny_mistral [--out models/tiny-mistral] [--seed 0] [--force]

The model has Mistral-7B-v0.1's architecture and vocabulary (32000) but 2 layers of width 64
(about 4.2 M parameters), so `axolotl train recipes/tiny-mistral-cpu.yml` exercises the real
pipeline on a CPU in about a minute. It is saved as a normal Hugging Face model directory
(config.json, model.safetensors, tokenizer files). Idempotent: an existing build with the same
settings is kept.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from core.errors import cli
from data_prep.tokenizer import (
    MISTRAL_BOS_ID,
    MISTRAL_EOS_ID,
    MISTRAL_VOCAB_SIZE,
    load_mistral_tokenizer,
)
from models import install_atomically, is_built, one_line_write_errors

LOG = logging.getLogger("models.tiny_mistral")

DEFAULT_OUT = Path("models/tiny-mistral")

# Mistral-7B-v0.1's shape scaled down; ratios (GQA 4:2, SwiGLU) kept.
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "sliding_window": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def mistral_config(**shape):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=MISTRAL_VOCAB_SIZE,
        bos_token_id=MISTRAL_BOS_ID,
        eos_token_id=MISTRAL_EOS_ID,
        **shape,
    )


def build_tiny_mistral(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny model to `out_dir` (atomically) unless an identical build is there."""
    out_dir = Path(out_dir)
    spec = {"seed": seed, "shape": TINY_SHAPE, "vocab_size": MISTRAL_VOCAB_SIZE}
    if not force and is_built(out_dir, spec):
        LOG.info("kept existing %s", out_dir)
        return out_dir

    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(mistral_config(**TINY_SHAPE)).to(torch.float32)
    tokenizer = load_mistral_tokenizer()

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    install_atomically(out_dir, spec, fill)
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("built %s: %.2f M parameters, vocab %d", out_dir, n_params / 1e6, MISTRAL_VOCAB_SIZE)
    print(f"tiny Mistral: {n_params:,} parameters -> {out_dir}")
    return out_dir


def run(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with one_line_write_errors(args.out):  # disk full, file-size limit, no permission
        build_tiny_mistral(args.out, seed=args.seed, force=args.force)


main = cli(run, prog="models.tiny_mistral")


if __name__ == "__main__":
    raise SystemExit(main())
