"""One check of the whole GPU path on the machine it runs on, with one JSON + Markdown summary.

Usage:
    make gpu-check                                     # = python -m gpu_check
    python -m gpu_check [--recipe recipes/mistral-qlora.yml] [--model auto|DIR|HUB_ID]
        [--out DIR | --out-root bench/results] [--work outputs/gpu-check] [--skip STAGE,...]
        [--set KEY=YAML ...] [--launcher auto|axolotl|python] [--deadline-s SECONDS]
        [--prep-args "..."] [--eval-args "..."] [--pytest-args "-m gpu"]

What a user does after cloning, each stage a real subprocess running the user's own command,
timed, with its peak GPU memory and its key figure:

  data_prep          python -m data_prep --mode clean
  model              the base model: --model DIR/HUB_ID; else the recipe's base_model when it is
                     a local directory; else mistralai/Mistral-7B-v0.1 when HF_TOKEN is set and
                     the hub grants access (downloaded once); else a random-init model of its
                     exact shape (python -m bench.build_random_mistral; compute and memory do not
                     depend on the weight values). The summary says which. A given model that
                     is not pretrained (every norm weight still 1.0, as transformers initialises
                     them) is trained as the built one is: without the recipe's loss watchdog.
  train_interrupted  axolotl train RECIPE, stopped with SIGTERM (to its process group, like
                     Ctrl-C or a scheduler's kill) as soon as its first checkpoint is complete
  train_resumed      the same command again: it must resume from that checkpoint and finish
  train_reference    the same recipe uninterrupted, for comparison (on a second GPU when there
                     is one, else beside the others on the same GPU); the summary reports the
                     adapter's and the losses' differences between resumed and uninterrupted
  evaluate           python -m eval RECIPE: perplexity + generations + report, one model load
  merge              axolotl merge-lora RECIPE
  merged_logits      the merged model's logits and loss vs base + adapter on held-out text
                     (python -m gpu_check.compare_merged)
  pytest             python -m pytest -m gpu, on the test files that hold GPU tests

The recipe is used as it is, except `base_model` (the model above), `output_dir` and
`dataset_prepared_path` (under --work, so nothing of yours in outputs/ is touched) and --set.
Training runs through `axolotl train` (or `python -m axolotl.cli.train` where the `accelerate`
launcher is not installed as a command, e.g. packages installed with pip --target), in the
environment every Axolotl command of the project gets (core/launch.py).

Outputs: OUT/summary.json, OUT/summary.md, OUT/logs.txt (the end of every stage's log), and the
run's perplexity.md and generations.md; OUT = --out, else OUT_ROOT/<date>-<gpu>/
(OUT_ROOT = bench/results). Exit status 0 when every stage that ran is ok. A stage that
failed or ended early says why, from its log: the loss watchdog, the NaN/inf stop, out of GPU
memory, a full disk, or killed by a signal.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

from core.errors import EXIT_FAILED, EXIT_OK, cli
from core.launch import CODE_ROOT
from gpu_check.check import STAGES, Check
from gpu_check.figures import gpu_slug
from gpu_check.model import DEFAULT_RANDOM_MODEL
from gpu_check.summary import render_summary, write_outputs

DEFAULT_RECIPE = Path("recipes/mistral-qlora.yml")
DEFAULT_WORK = Path("outputs/gpu-check")
DEFAULT_OUT_ROOT = Path("bench/results")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpu_check",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--model", default="auto",
                        help="base model: a directory or hub id (default auto: see below)")
    parser.add_argument("--random-model-dir", type=Path, default=DEFAULT_RANDOM_MODEL,
                        help="where the random-init model is built (kept for the next run)")
    parser.add_argument("--tokenizer-from", type=Path,
                        help="tokenizer files for the random-init model (default: the "
                        "mistral-common package)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="runs, merged model and logs (its run folders are replaced)")
    parser.add_argument("--out", type=Path, help="summary directory (default OUT_ROOT/<date>-<gpu>)")
    parser.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT)
    parser.add_argument("--skip", default="", help=f"comma-separated stages: {', '.join(STAGES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="override a recipe key for every run (e.g. max_steps=6)")
    parser.add_argument("--launcher", choices=("auto", "axolotl", "python"), default="auto",
                        help="`axolotl train` (auto: when the accelerate command exists) or "
                        "`python -m axolotl.cli.train`")
    parser.add_argument("--deadline-s", type=float,
                        help="stop starting stages, and kill running ones, this many seconds "
                        "after the start (the summary is still written)")
    parser.add_argument("--prep-args", default="", help="extra data_prep arguments")
    parser.add_argument("--eval-args", default="", help="extra `python -m eval` arguments")
    parser.add_argument("--pytest-args", default="-m gpu", help="pytest selection")
    args = parser.parse_args(argv)
    unknown = {s.strip() for s in args.skip.split(",") if s.strip()} - set(STAGES)
    if unknown:
        parser.error(f"--skip: unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    if not (CODE_ROOT / args.recipe).is_file():
        parser.error(f"--recipe {args.recipe}: not found (run from the repository root)")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(CODE_ROOT)  # recipes and data paths are relative to the repository root
    check = Check(args)
    summary = check.execute()
    day = dt.date.today().isoformat()
    out = args.out or args.out_root / f"{day}-{gpu_slug(check.gpus)}"
    written = write_outputs(summary, out, check.work)
    print(render_summary(summary))
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK if summary["ok"] else EXIT_FAILED


main = cli(run, prog="gpu_check")


if __name__ == "__main__":
    raise SystemExit(main())
