"""make demo: the whole pipeline offline on a CPU, with a real pretrained model.

Usage:
    python -m demo                                    # what `make demo` runs
    python -m demo --recipe recipes/tiny-mistral-cpu.yml   # same pipeline, 4 M-param model
    python -m demo --max-steps 4 --output-dir /tmp/demo    # a shortened run (the test does this)

Steps, each printed as it starts:
  1. data prep     python -m data_prep --mode clean            -> data/prepared/clean/
  2. model cache   python -m models.smollm2 (or tiny_mistral)  -> models/<name>/
  3. fine-tune     axolotl train <recipe>                      -> outputs/<recipe>/ (the adapter)
  4. perplexity    python -m eval.perplexity --compare         held-out chapters + control text
  5. generations   python -m eval.generate                     base vs adapter, memorisation
  6. report        python -m eval.report                       report.md + PNG charts
and ends with a short summary (perplexity before -> after, times, where the report and the
TensorBoard logs are), also saved as <output_dir>/demo_summary.json. Next: `make export`
turns the run into GGUF files for llama.cpp / Ollama / LM Studio (python -m export).
Re-running is cheap where nothing changed: prep and the model cache are kept, and axolotl resumes
from the newest checkpoint (a finished run only re-saves the adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = Path("recipes/smollm2-demo-cpu.yml")
CONTROL_TEXT = Path("eval/control_passage.txt")
HELD_OUT = Path("data/prepared/clean/eval.jsonl")
TRAIN = Path("data/prepared/clean/train.jsonl")


class DemoError(Exception):
    pass


def banner(step: int, title: str) -> None:
    print(f"\n=== [{step}/6] {title} ===", flush=True)


def build_base_model(base_model: str) -> None:
    """Create the local model a recipe points at (kept when already built)."""
    name = base_model.removeprefix("./").rstrip("/")
    if name == "models/smollm2-135m":
        from models.smollm2 import build_smollm2

        build_smollm2(REPO / name)
    elif name == "models/tiny-mistral":
        from models.tiny_mistral import build_tiny_mistral

        build_tiny_mistral(REPO / name)
    elif not (REPO / name).is_dir():
        raise DemoError(f"base_model {base_model}: the demo only builds models/smollm2-135m and "
                        "models/tiny-mistral; point --recipe at a CPU recipe")


def effective_recipe(recipe: Path, output_dir: Path | None, max_steps: int | None) -> Path:
    """The recipe itself, or a copy with the demo's overrides written next to its outputs."""
    if output_dir is None and max_steps is None:
        return recipe
    cfg = yaml.safe_load(recipe.read_text())
    if output_dir is not None:
        cfg["output_dir"] = str(output_dir)
        cfg["dataset_prepared_path"] = str(output_dir / "prepared")
    if max_steps is not None:
        cfg["max_steps"] = max_steps
        for key in ("save_steps", "eval_steps"):  # keep cadences inside the shorter run
            if isinstance(cfg.get(key), int):
                cfg[key] = min(cfg[key], max_steps)
        if isinstance(cfg.get("warmup_steps"), int):  # a short run should not be all warm-up
            cfg["warmup_steps"] = min(cfg["warmup_steps"], max(1, max_steps // 4))
    target = Path(cfg["output_dir"]) / "demo-recipe.yml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# {recipe} with `python -m demo` overrides\n"
                      + yaml.safe_dump(cfg, sort_keys=False))
    return target


def train(recipe: Path) -> float:
    """`axolotl train recipe` as a subprocess (its progress bar streams through); wall seconds."""
    axolotl = Path(sys.executable).with_name("axolotl")
    env = os.environ.copy()
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["AXOLOTL_DO_NOT_TRACK"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    env["PATH"] = f"{axolotl.parent}{os.pathsep}{env.get('PATH', '')}"  # accelerate
    print(f"$ axolotl train {recipe}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([str(axolotl), "train", str(recipe)], cwd=REPO, env=env)
    if proc.returncode != 0:
        raise DemoError(f"axolotl train {recipe} failed (exit {proc.returncode}); see above")
    return time.perf_counter() - start


def run_eval_step(module: str, argv: list[str]) -> None:
    """Run one eval script's main() in this process; its own one-line errors are kept."""
    print(f"$ python -m {module} {' '.join(argv)}", flush=True)
    main = __import__(module, fromlist=["main"]).main
    status = main(argv)
    if status:
        raise DemoError(f"python -m {module} failed (exit {status}); see above")


def tokens_trained(output_dir: Path) -> int | None:
    """Real (non-padding) tokens axolotl counted, from the newest trainer_state.json."""
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    if (output_dir / "trainer_state.json").is_file():
        states.append(output_dir / "trainer_state.json")
    for state in reversed(states):
        history = json.loads(state.read_text())["log_history"]
        counts = [row["tokens/trainable"] for row in history if "tokens/trainable" in row]
        if counts:
            return int(counts[-1])
    return None


def summarise(output_dir: Path, train_seconds: float, recipe: Path, demo_seconds: float) -> dict:
    results = json.loads((output_dir / "eval" / "perplexity.json").read_text())
    by_kind = {d["kind"]: d for d in results["datasets"]}

    def before_after(kind: str) -> dict:
        metrics = by_kind[kind]["metrics"]
        return {"base": metrics["base"]["corpus_ppl"], "adapter": metrics["adapter"]["corpus_ppl"],
                "change_pct": by_kind[kind]["relative_change_pct"]["corpus_ppl"]}

    generations_file = output_dir / "eval" / "generations.json"
    summary = {
        "recipe": str(recipe),
        "held_out_corpus_ppl": before_after("held-out"),
        "control_corpus_ppl": before_after("control"),
        "train_seconds": round(train_seconds, 1),
        "demo_seconds": round(demo_seconds, 1),
        "tokens_trained": tokens_trained(output_dir),
        "report": str(output_dir / "report.md"),
        "tensorboard": str(output_dir / "runs") if (output_dir / "runs").is_dir() else None,
        "generations": str(generations_file) if generations_file.is_file() else None,
    }
    tmp = output_dir / "demo_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output_dir / "demo_summary.json")
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
    cfg = yaml.safe_load(Path(recipe).read_text())
    run_dir = Path(output_dir or cfg["output_dir"])

    banner(1, "data prep: data/prepared/clean/")
    from data_prep.prepare import main as prep_main

    if prep_main(["--mode", "clean", *prep_args]) != 0:
        raise DemoError("data prep failed; see the error above")

    banner(2, f"model cache: {cfg['base_model']}")
    build_base_model(str(cfg["base_model"]))

    banner(3, f"fine-tune: axolotl train {recipe}")
    train_seconds = train(effective_recipe(Path(recipe), output_dir, max_steps))

    banner(4, "perplexity: base vs adapter, held-out chapters and a control passage")
    rows = ["--max-rows", str(max_eval_rows)] if max_eval_rows else []
    run_eval_step("eval.perplexity", ["--adapter", str(run_dir), "--compare",
                                      "--data", str(HELD_OUT), "--control", str(CONTROL_TEXT),
                                      "--no-progress", *rows])

    banner(5, "generations: base vs adapter, with the memorisation check")
    run_eval_step("eval.generate", ["--adapter", str(run_dir), "--train", str(TRAIN),
                                    "--max-new-tokens", str(max_new_tokens)])

    banner(6, f"report: {run_dir / 'report.md'}")
    run_eval_step("eval.report", [str(run_dir)])

    summary = summarise(run_dir, train_seconds, Path(recipe), time.perf_counter() - start)
    print_summary(summary)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--output-dir", type=Path, help="override the recipe's output_dir")
    parser.add_argument("--max-steps", type=int, help="override the recipe's max_steps")
    parser.add_argument("--max-eval-rows", type=int, help="score only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--csv", type=Path, help="passed to data_prep (default: find or fetch)")
    parser.add_argument("--skip-checksum", action="store_true", help="passed to data_prep")
    args = parser.parse_args(argv)
    prep_args = (("--csv", str(args.csv)) if args.csv else ()) + (
        ("--skip-checksum",) if args.skip_checksum else ())
    try:
        run_demo(args.recipe, args.output_dir, args.max_steps, args.max_eval_rows,
                 args.max_new_tokens, prep_args)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
