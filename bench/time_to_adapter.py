"""The time a user waits: `axolotl train RECIPE` as shipped, from the command to the adapter on disk.

Usage:
    python -m bench.time_to_adapter --model /tmp/mistral-7b-random \
        [--recipe recipes/mistral-qlora.yml] [--label NAME] [--set KEY=YAML ...] \
        [--work-dir /tmp/tta] [--results tta.jsonl] [--launcher accelerate|python]

The recipe runs exactly as users run it: the `axolotl train` command (which re-launches itself
through `accelerate launch`), its epochs, evaluations, checkpoints and final save as written,
on a freshly prepared dataset. Only these change: `base_model` (and a local tokenizer) point
at --model, `output_dir`/`dataset_prepared_path` go under --work-dir, W&B stays off, and
bench.timeline's plugin is appended to `plugins:` to timestamp the parts. One JSON line per run
is appended to --results: `time_to_adapter_s` (command start to exit, the adapter checked to be
there) and `parts` (bench/timeline.py: launchers, imports and config, data, model load, Trainer
setup, first step, later steps, evaluations, checkpoints, final save, exit), plus the run's
final train loss and eval losses from its trainer_state.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.timeline import ENV_TIMELINE, breakdown
from core.errors import EXIT_FAILED, EXIT_OK, UserError, cli
from core.files import append_jsonl, read_jsonl
from core.launch import axolotl_command, environment, run_logged, shown
from core.runs import load_recipe, parse_overrides, write_recipe
from core.runs import merge_config as merge

PLUGIN = "bench.timeline.TimelinePlugin"
ADAPTER_FILE = "adapter_model.safetensors"
NO_REMOTE_LOGGING = dict.fromkeys(("wandb_project", "wandb_entity", "wandb_name",
                                   "hub_model_id", "mlflow_tracking_uri"))


def run_config(recipe: dict, model: Path, run_dir: Path, sets: dict) -> dict:
    cfg = merge(recipe, {"base_model": str(model), "output_dir": str(run_dir / "out"),
                         "dataset_prepared_path": str(run_dir / "prepared"),
                         **NO_REMOTE_LOGGING})
    for key in ("base_model_config", "tokenizer_config"):
        if key in recipe:
            cfg[key] = str(model)
    cfg = merge(cfg, sets)
    cfg["plugins"] = [*(cfg.get("plugins") or []), PLUGIN]
    return cfg


def command(config: Path, launcher: str) -> list[str]:
    """The user's command; `python` runs the same training in one process (no accelerate)."""
    extra = ["--launcher", "python"] if launcher == "python" else []
    return axolotl_command("train", config, *extra, launcher="axolotl")


def losses(out_dir: Path) -> dict:
    """Final train loss and eval losses from the newest checkpoint's trainer_state.json."""
    states = sorted(out_dir.glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[-1]))
    if not states:
        return {}
    history = json.loads(states[-1].read_text()).get("log_history", [])
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"final_train_loss": train[-1] if train else None, "eval_losses": evals}


def run(args, recipe: dict, sets: dict) -> dict:
    run_dir = args.work_dir / args.label
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config = write_recipe(run_config(recipe, args.model, run_dir, sets), run_dir / "config.yml")
    timeline = run_dir / "timeline.jsonl"
    env = environment(**{ENV_TIMELINE: str(timeline)})
    argv = command(config, args.launcher)
    print(f"[time_to_adapter] {args.label}: $ {shown(argv)}", flush=True)
    log_path = run_dir / "log.txt"
    launched = time.time()
    returncode, _ = run_logged(argv, log_path, env)
    finished = time.time()
    adapter = run_dir / "out" / ADAPTER_FILE
    events = read_jsonl(timeline, skip_bad_lines=True) if timeline.is_file() else []
    result = {
        "label": args.label, "recipe": str(args.recipe), "sets": sets,
        "launcher": args.launcher, "command": "axolotl train " + " ".join(argv[2:]),
        "started": datetime.fromtimestamp(launched, UTC).isoformat(timespec="seconds"),
        "returncode": returncode, "adapter": adapter.is_file(),
        "status": "ok" if returncode == 0 and adapter.is_file() else
                  f"failed (rc {returncode}{'' if adapter.is_file() else ', no adapter'})",
        **breakdown(events, launched, finished), **losses(run_dir / "out"),
        "log": str(log_path),
    }
    return result


def format_result(r: dict) -> str:
    lines = [f"{r['label']}: {r['status']}, time to adapter {r['time_to_adapter_s']:.1f} s "
             f"({r.get('steps', '?')} steps, {r.get('evaluations', '?')} evaluations, "
             f"{r.get('checkpoints', '?')} checkpoints)"]
    for name, seconds in (r.get("parts") or {}).items():
        lines.append(f"  {name:22s} {seconds:7.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/mistral-qlora.yml"))
    parser.add_argument("--label", default=None, help="run name (default: the recipe's stem)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=YAML")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/time-to-adapter"))
    parser.add_argument("--results", type=Path, default=None, help="JSONL to append to")
    parser.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate",
                        help="accelerate: `axolotl train` as users type it (default)")
    args = parser.parse_args(argv)
    args.model, args.work_dir = args.model.resolve(), args.work_dir.resolve()
    if not (args.model / "config.json").is_file():
        raise UserError(f"--model {args.model}: no config.json there; build one with "
                        "`python -m bench.build_random_mistral --out DIR`")
    if not args.recipe.is_file():
        raise UserError(f"--recipe {args.recipe}: not found")
    args.label = args.label or args.recipe.stem
    result = run(args, load_recipe(args.recipe), parse_overrides(args.sets))
    if args.results:
        append_jsonl(args.results.resolve(), result)
    print(format_result(result), flush=True)
    return EXIT_OK if result["status"] == "ok" else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(cli(main)())
