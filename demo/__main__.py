"""make demo: the whole pipeline offline on a CPU, with a real pretrained model.

Usage:
    python -m demo                                    # what `make demo` runs
    python -m demo --recipe recipes/tiny-mistral-cpu.yml   # same pipeline, 4 M-param model
    python -m demo --max-steps 4 --output-dir /tmp/demo    # a shortened run (the test does this)

Steps, each printed as it starts:
  1. data prep     python -m data_prep --mode clean            -> data/prepared/clean/
  2. model cache   python -m models.smollm2 (or tiny_mistral)  -> models/<name>/
  3. fine-tune     axolotl train <recipe>                      -> outputs/<recipe>/ (the adapter)
  4. evaluation    python -m eval <recipe>                     perplexity (held-out chapters and
                   a control text), generations with the memorisation check, report.md + charts
and ends with a short summary (perplexity before -> after, times, where the report and the
TensorBoard logs are), also saved as <output_dir>/demo_summary.json. Next: `make export`
turns the run into GGUF files for llama.cpp / Ollama / LM Studio (python -m export).
Re-running is cheap where nothing changed: prep and the model cache are kept, and axolotl resumes
from the newest checkpoint (a finished run only re-saves the adapter).

What is trained and scored (data, output directory, file names, metric keys) comes from the
recipe through core/runs.py, the same definition `python -m eval` and the Docker eval service use.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from core.errors import EXIT_FAILED, UserError, cli
from core.files import write_json
from core.launch import CODE_ROOT, axolotl_command, environment
from core.runs import CONTROL_CORPUS_PPL, HELD_OUT_CORPUS_PPL, Run, load_recipe, write_recipe

REPO = CODE_ROOT
DEFAULT_RECIPE = Path("recipes/smollm2-demo-cpu.yml")
STEPS = 4
SUMMARY_JSON = "demo_summary.json"
# The local models the demo knows how to build: base_model as written in a recipe -> builder.
BUILDERS = {"models/smollm2-135m": ("models.smollm2", "build_smollm2"),
            "models/tiny-mistral": ("models.tiny_mistral", "build_tiny_mistral")}


class StepFailed(Exception):
    """A step that already printed its own error (exit status 1)."""


def banner(step: int, title: str) -> None:
    print(f"\n=== [{step}/{STEPS}] {title} ===", flush=True)


def build_base_model(base_model: str) -> None:
    """Create the local model a recipe points at (kept when already built)."""
    name = base_model.removeprefix("./").rstrip("/")
    if name in BUILDERS:
        module, function = BUILDERS[name]
        getattr(__import__(module, fromlist=[function]), function)(REPO / name)
    elif not (REPO / name).is_dir():
        raise UserError(f"base_model {base_model}: the demo only builds "
                        f"{' and '.join(sorted(BUILDERS))}; point --recipe at a CPU recipe")


def effective_recipe(recipe: Path, output_dir: Path | None, max_steps: int | None) -> Path:
    """The recipe itself, or a copy with the demo's overrides written next to its outputs."""
    if output_dir is None and max_steps is None:
        return recipe
    cfg = load_recipe(recipe)
    overrides: dict = {}
    if output_dir is not None:
        overrides.update(output_dir=str(output_dir),
                         dataset_prepared_path=str(output_dir / "prepared"))
    if max_steps is not None:
        overrides["max_steps"] = max_steps
        for key in ("save_steps", "eval_steps"):  # keep cadences inside the shorter run
            if isinstance(cfg.get(key), int):
                overrides[key] = min(cfg[key], max_steps)
        if isinstance(cfg.get("warmup_steps"), int):  # a short run should not be all warm-up
            overrides["warmup_steps"] = min(cfg["warmup_steps"], max(1, max_steps // 4))
    target = Path(overrides.get("output_dir", cfg["output_dir"])) / "demo-recipe.yml"
    return write_recipe(cfg, target, overrides, header=f"{recipe} with `python -m demo` overrides")


def train(recipe: Path) -> float:
    """`axolotl train recipe` as a subprocess (its progress bar streams through); wall seconds."""
    print(f"$ axolotl train {recipe}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(axolotl_command("train", recipe, launcher="axolotl"), cwd=REPO,
                          env=environment())
    if proc.returncode != 0:
        print(f"demo: error: axolotl train {recipe} failed (exit {proc.returncode}); see above",
              file=sys.stderr)
        raise StepFailed
    return time.perf_counter() - start


def training_precision(run: Run) -> str | None:
    """How the newest checkpoint was trained, from the Trainer's own saved arguments: bf16 over
    fp32 weights is the recipe's bf16_autocast plugin at work (a CPU with bf16 instructions)."""
    newest = run.newest_trainer_state()
    args_file = newest[0].parent / "training_args.bin" if newest else None
    if args_file is None or not args_file.is_file():
        return None
    import torch

    try:  # a pickle the run itself wrote
        args = torch.load(args_file, weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable file only drops this summary line
        return None
    return ("bf16 autocast (fp32 weights)" if getattr(args, "bf16", False) else
            "fp16" if getattr(args, "fp16", False) else "fp32")


def summarise(run: Run, recipe: Path, evaluation: dict, train_seconds: float,
              demo_seconds: float) -> dict:
    summary = {
        "recipe": str(recipe),
        # {"base": ..., "adapter": ..., "change_pct": ...}, as evaluation.json has them
        "held_out_corpus_ppl": evaluation[HELD_OUT_CORPUS_PPL],
        "control_corpus_ppl": evaluation[CONTROL_CORPUS_PPL],
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": evaluation["seconds"],
        "demo_seconds": round(demo_seconds, 1),
        "tokens_trained": run.tokens_trained(),
        "training_precision": training_precision(run),
        "report": str(run.report_md),
        "tensorboard": str(run.tensorboard_dir) if run.tensorboard_dir.is_dir() else None,
        "generations": str(run.generations_json) if run.generations_json.is_file() else None,
    }
    write_json(run.output_dir / SUMMARY_JSON, summary)
    return summary


def print_summary(summary: dict) -> None:
    held, control = summary["held_out_corpus_ppl"], summary["control_corpus_ppl"]
    tokens = summary["tokens_trained"]
    print("\n=== demo summary ===")
    print(f"held-out Frankenstein perplexity: {held['base']:.2f} -> {held['adapter']:.2f} "
          f"({held['change_pct']:+.1f}%)")
    print(f"control passage perplexity:       {control['base']:.2f} -> {control['adapter']:.2f} "
          f"({control['change_pct']:+.1f}%)")
    print(f"training time:                    {summary['train_seconds'] / 60:.1f} min "
          "(axolotl train, wall clock)")
    if summary.get("training_precision"):
        print(f"training precision:               {summary['training_precision']}")
    print(f"tokens trained:                   {tokens:,}" if tokens else
          "tokens trained:                   n/a")
    print(f"whole demo:                       {summary['demo_seconds'] / 60:.1f} min "
          "(wall clock, from data prep to report)")
    if summary.get("tensorboard"):
        print(f"training curves:                  tensorboard --logdir {summary['tensorboard']}")
    print(f"report:                           {summary['report']}")


def run_demo(recipe: Path = DEFAULT_RECIPE, output_dir: Path | None = None,
             max_steps: int | None = None, max_eval_rows: int | None = None,
             max_new_tokens: int = 100, prep_args: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    os.chdir(REPO)  # recipes use paths relative to the repository root
    if not Path(recipe).is_file():
        raise UserError(f"--recipe {recipe}: no such file; pass a recipe under recipes/")

    banner(1, "data prep: data/prepared/clean/")
    from data_prep.prepare import main as prep_main

    if prep_main(["--mode", "clean", *prep_args]) != 0:
        raise StepFailed  # data_prep printed its one-line error

    run_recipe = effective_recipe(Path(recipe), output_dir, max_steps)
    run = Run.from_recipe(run_recipe)
    banner(2, f"model cache: {run.base_model}")
    build_base_model(run.base_model or "")

    banner(3, f"fine-tune: axolotl train {recipe}")
    train_seconds = train(run_recipe)

    banner(4, f"evaluation: python -m eval {run_recipe} (perplexity, generations, report)")
    from eval.pipeline import Options, evaluate_run

    rows = f" --max-rows {max_eval_rows}" if max_eval_rows else ""
    print(f"$ python -m eval {run_recipe} --no-progress --max-new-tokens {max_new_tokens}{rows}",
          flush=True)
    evaluation = evaluate_run(Options(run_recipe, no_progress=True, max_new_tokens=max_new_tokens,
                                      max_rows=max_eval_rows or None))

    summary = summarise(run, Path(recipe), evaluation, train_seconds,
                        time.perf_counter() - start)
    print_summary(summary)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--output-dir", type=Path, help="override the recipe's output_dir")
    parser.add_argument("--max-steps", type=int, help="override the recipe's max_steps")
    parser.add_argument("--max-eval-rows", type=int, help="score only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--csv", type=Path, help="passed to data_prep (default: data/raw/, else "
                        "a download)")
    parser.add_argument("--skip-checksum", action="store_true", help="passed to data_prep")
    return parser.parse_args(argv)


def run_main(argv=None) -> int:
    args = parse_args(argv)
    prep_args = (("--csv", str(args.csv)) if args.csv else ()) + (
        ("--skip-checksum",) if args.skip_checksum else ())
    try:
        run_demo(args.recipe, args.output_dir, args.max_steps, args.max_eval_rows,
                 args.max_new_tokens, prep_args)
    except StepFailed:
        return EXIT_FAILED
    return 0


main = cli(run_main, prog="demo")


if __name__ == "__main__":
    raise SystemExit(main())
