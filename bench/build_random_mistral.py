"""Build a random-init MistralForCausalLM of Mistral-7B-v0.1's exact shape, saved locally.

Usage:
    python -m bench.build_random_mistral --out /tmp/mistral-7b-random            # GPU, ~14.5 GB
    python -m bench.build_random_mistral --out /tmp/tiny --tiny --device cpu      # CPU tests
    python -m bench.build_random_mistral --tokenizer-only --out models/mistral-tokenizer

Throughput and memory per training step do not depend on the weight values, so a random model
with the real config (7.24 B parameters, vocab 32000) stands in for the hub checkpoint on a
machine without the hub. Weights are initialised directly on `--device` in `--dtype` (bf16 on
the GPU takes ~25 s), then saved with safetensors. The Mistral tokenizer is written beside them:
from `--tokenizer-from DIR` (a directory saved by `save_pretrained`, e.g. one made here with
`--tokenizer-only`, needed where the `mistral_common` package is missing), else from
`data_prep.tokenizer.load_mistral_tokenizer()`. The output directory appears atomically (a
staging folder renamed into place, as models/ builds are); an existing build with the same spec
is kept.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from core.errors import UserError, cli
from models import install_atomically, is_built

LOG = logging.getLogger("bench.build_random_mistral")

BUILD_MARKER = "bench-build.json"

# Mistral-7B-v0.1's config.json (the hub's), as far as shapes and numerics go.
MISTRAL_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
MISTRAL_7B_PARAMS = 7_241_732_096  # hub model card / the config above

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


def save_tokenizer(out_dir: Path, tokenizer_from: Path | None) -> None:
    """Write the Mistral tokenizer files into `out_dir`."""
    if tokenizer_from is None:
        from data_prep.tokenizer import load_mistral_tokenizer

        load_mistral_tokenizer().save_pretrained(out_dir)
        return
    copied = [name for name in TOKENIZER_FILES if (tokenizer_from / name).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise UserError(
            f"--tokenizer-from {tokenizer_from}: no tokenizer.json or tokenizer.model there; "
            "make it with `python -m bench.build_random_mistral --tokenizer-only --out DIR`"
        )
    for name in copied:
        shutil.copyfile(tokenizer_from / name, out_dir / name)


def build(out_dir: Path, tiny: bool = False, device: str = "cuda", dtype: str = "bfloat16",
          seed: int = 0, tokenizer_from: Path | None = None, force: bool = False) -> Path:
    """Build and save the model (atomically); returns `out_dir`."""
    import torch

    from models.tiny_mistral import TINY_SHAPE, mistral_config

    shape = TINY_SHAPE if tiny else MISTRAL_7B_SHAPE
    spec = {"shape": shape, "dtype": dtype, "seed": seed}
    if not force and is_built(out_dir, spec, BUILD_MARKER):
        LOG.info("kept existing %s", out_dir)
        print(f"random Mistral: kept existing {out_dir}")
        return out_dir
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; pass --device cpu (with --tiny)")

    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    started = time.perf_counter()
    config = mistral_config(**shape)
    # Allocating and initialising on the target device avoids a 29 GB fp32 CPU detour.
    with torch.device(device):
        model = MistralForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    if device == "cuda":
        torch.cuda.synchronize()
    built_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, max_shard_size="5GB")
        save_tokenizer(staging, tokenizer_from)

    install_atomically(out_dir, spec, fill, BUILD_MARKER)
    saved_s = time.perf_counter() - started - built_s
    size_gb = sum(f.stat().st_size for f in out_dir.iterdir()) / 1e9
    print(f"random Mistral: {n_params:,} parameters ({dtype}) built on {device} in {built_s:.1f} s,"
          f" saved {size_gb:.2f} GB in {saved_s:.1f} s -> {out_dir}")
    return out_dir


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--tiny", action="store_true",
                        help="the 4.2 M-parameter shape of models.tiny_mistral (CPU tests)")
    parser.add_argument("--device", default="cuda", help="where to initialise (cuda|cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="copy tokenizer files from this directory instead of mistral_common")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="write only the tokenizer files into --out (to copy to a GPU box)")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.tokenizer_only:
        args.out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(args.out, args.tokenizer_from)
        print(f"tokenizer -> {args.out}: {sorted(p.name for p in args.out.iterdir())}")
        return 0
    build(args.out, tiny=args.tiny, device=args.device, dtype=args.dtype, seed=args.seed,
          tokenizer_from=args.tokenizer_from, force=args.force)
    return 0


main = cli(run, prog="bench.build_random_mistral")


if __name__ == "__main__":
    raise SystemExit(main())
