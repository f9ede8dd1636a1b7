"""Training throughput, memory and MFU: the notebook's method vs the axolotl recipe and variants.

Usage:
    python -m bench.train_throughput --model /tmp/mistral-7b-random \
        [--variants notebook,recipe,varlen,...] [--recipe recipes/mistral-qlora.yml] \
        [--warmup 3 --steps 10] [--results bench/results/throughput.jsonl] \
        [--deadline-unix EPOCH | --budget-s 480] [--gpus N [--launcher torchrun|accelerate]] \
        [--set KEY=YAML ...] [--cpu]
    python -m bench.train_throughput --table bench/results/throughput.jsonl   # reprint a table
    python -m bench.train_throughput --list                                   # the variants

Each variant (bench/variants.py) runs in its own process for `warmup + steps` optimizer steps:
the notebook baseline through bench.notebook_baseline, the others through
`python -m axolotl.cli.train <generated.yml>` (under torchrun/accelerate with --gpus N > 1),
the generated config being the recipe + benchmark settings (the given model, max_steps,
gradient accumulation 1, no saves/evals/watchdog, a fresh output_dir under --work-dir, logging
every step, the throughput plugin) + the variant's overrides + --set. `eval` variants time
`python -m eval.perplexity --compare` on the adapter that the `recipe` run saved. bench.step_recorder writes one JSON line per optimizer step;
the first `--warmup` steps are dropped and the rest summarised into one JSON line appended to
--results right after each run (so a cut-off session keeps what finished):
tokens/s (real tokens: padding excluded; summed over GPUs), seconds/step (median and mean),
peak GPU memory (allocated and reserved, GiB, max over GPUs and steps; loading excluded,
`load_*` has it), trainable parameters, MFU/HFU (bench/flops.py: vs 989 TFLOP/s H100 bf16 peak
and vs the measured 790 TFLOP/s matmul), final loss and whether all losses were finite.

Time guard: a run starts only if its estimated cost (the slowest finished run of its kind, or
--estimate-s at first) fits before the deadline, and each run is killed at the deadline; a
skipped or cut run still gets its line (status `skipped: budget` / `timeout`). A table of this
invocation's runs is printed last. `--cpu` makes everything run on a CPU (tests): fp32
everywhere (the notebook's compute dtype too), axolotl's LoRA Triton kernels and Liger off, and
axolotl's QLoRA turned into LoRA (the notebook keeps its 4-bit model: bitsandbytes runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.common import ENV_STEPS_PATH
from bench.flops import H100_MEASURED_MATMUL_FLOPS, H100_PEAK_BF16_FLOPS, utilisation
from bench.variants import DEFAULT_VARIANTS, LORA_KERNELS, VARIANTS, expand_overrides
from core.errors import EXIT_FAILED, EXIT_OK, UserError, cli
from core.files import append_jsonl, read_jsonl
from core.launch import CODE_ROOT, axolotl_command, environment, run_logged, shown
from core.runs import (
    EVAL_SUBDIR,
    PERPLEXITY_JSON,
    load_recipe,
    parse_overrides,
    write_recipe,
)
from core.runs import merge_config as merge

REPO_ROOT = CODE_ROOT
PLUGIN = "bench.axolotl_plugin.ThroughputPlugin"
DEFAULT_RECIPE = Path("recipes/mistral-qlora.yml")
DEFAULT_RESULTS = Path("bench/results/throughput.jsonl")
DEFAULT_ESTIMATE_S = (120.0, 150.0, 90.0)  # notebook, axolotl, eval runs (s)
UNSLOTH_ESTIMATE_S = 180.0  # an Unsloth run before one has finished (it compiles its layers)
KILL_GRACE_S = 10
# Keys that would save, evaluate, resume, log remotely or stop early: off for benchmarks.
REMOVED_KEYS = ("save_steps", "saves_per_epoch", "save_total_limit", "save_first_step",
                "eval_steps", "evals_per_epoch", "test_datasets", "do_bench_eval",
                "eval_table_size", "resume_from_checkpoint", "hub_model_id", "hub_strategy",
                "wandb_project", "wandb_entity", "wandb_name", "wandb_log_model", "wandb_watch",
                "mlflow_tracking_uri", "comet_project_name", "loss_watchdog_threshold",
                "loss_watchdog_patience", "early_stopping_patience", "load_best_model_at_end",
                "metric_for_best_model", "greater_is_better")


# ----------------------------------------------------------------------------------------------
# Configs


def cpu_overrides(cfg: dict) -> dict:
    """What makes a GPU recipe run on a CPU: fp32 (`bf16: auto` would pick fp16 there), no
    Triton kernels or Liger (they need CUDA), and LoRA on unquantised weights (the recipe guard
    refuses 4-bit loading without CUDA)."""
    out = {"bf16": False, "fp16": False, "tf32": False, "liger": False,
           **dict.fromkeys((*LORA_KERNELS, "lora_embedding_kernel"), False)}
    if cfg.get("load_in_4bit") or cfg.get("load_in_8bit"):
        out.update(load_in_4bit=False, load_in_8bit=False, adapter="lora")
    if str(cfg.get("attn_implementation", "")).startswith(("flash", "flex")):
        out["attn_implementation"] = "sdpa"
    return out


def axolotl_config(recipe: dict, overrides: dict, *, model_dir: Path, run_dir: Path,
                   prepared_dir: Path, max_steps: int, cpu: bool, sets: dict) -> dict:
    """The recipe with benchmark settings, the variant's overrides, CPU settings and --set."""
    bench = {
        "base_model": str(model_dir),
        "output_dir": str(run_dir / "out"),
        "dataset_prepared_path": str(prepared_dir),
        "max_steps": max_steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "val_set_size": 0.0,
        "auto_resume_from_checkpoints": False,
        **dict.fromkeys(REMOVED_KEYS),
    }
    for key in ("base_model_config", "tokenizer_config"):  # may name a hub id: use the model's
        if key in recipe:
            bench[key] = str(model_dir)
    overrides = merge(overrides, cpu_overrides(merge(recipe, overrides))) if cpu else overrides
    variant, plugins = expand_overrides(overrides, recipe.get("plugins") or [])
    cfg = merge(merge(recipe, bench), variant)
    cfg["plugins"] = [p for p in plugins if p != PLUGIN] + [PLUGIN]
    return merge(cfg, sets)


# ----------------------------------------------------------------------------------------------
# Running


def subprocess_env(label: str, steps_path: Path, threads: int | None, processes: int = 1,
                   axolotl: bool = True) -> dict:
    """The project's environment for Axolotl's commands (core/launch.py), with the run's label
    and where its step records go; `axolotl=False` for the peers, which run as users run them."""
    env = environment(processes=processes, axolotl_allocator=axolotl, BENCH_LABEL=label,
                      **{ENV_STEPS_PATH: str(steps_path)})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_process(argv: list[str], env: dict, log_path: Path, timeout_s: float) -> tuple[int, bool]:
    """Run in its own session (so a timeout kills launcher and workers); (returncode, timed_out)."""
    log_path.write_text("$ " + shown(argv) + "\n")
    return run_logged(argv, log_path, env, timeout_s=timeout_s, grace_s=KILL_GRACE_S, mode="a")


# ----------------------------------------------------------------------------------------------
# Summaries


def read_records(steps_path: Path) -> list[dict]:
    """Every rank's step records (a line cut by a kill is skipped)."""
    records = []
    for path in sorted(steps_path.parent.glob(f"{steps_path.stem}.rank*{steps_path.suffix}")):
        records += read_jsonl(path, skip_bad_lines=True)
    return records


def summarize(records: list[dict], warmup: int) -> dict:
    """Figures over the steps after `warmup`; steps of all ranks merged (tokens summed, the
    slowest rank's time, the largest memory)."""
    metas = [r for r in records if r.get("event") == "meta"]
    by_step: dict[int, list[dict]] = {}
    for r in records:
        if r.get("event") == "step":
            by_step.setdefault(r["step"], []).append(r)
    world = max((m.get("world_size", 1) for m in metas), default=None)
    steps = []
    for number in sorted(by_step):
        ranks = by_step[number]
        steps.append({
            "step": number,
            "step_s": max(r["step_s"] for r in ranks),
            "tokens": sum(r["tokens"] for r in ranks),
            "model_flops": sum(r["model_flops"] for r in ranks),
            "hardware_flops": sum(r["hardware_flops"] for r in ranks),
            "loss": statistics.fmean(r["loss"] for r in ranks),
            "peak_alloc_gib": max((r["peak_alloc_gib"] or 0 for r in ranks), default=0) or None,
            "peak_reserved_gib": max((r["peak_reserved_gib"] or 0 for r in ranks),
                                     default=0) or None,
        })
    measured = [s for s in steps if s["step"] > warmup]
    meta = metas[0] if metas else {}
    out = {
        "steps_recorded": len(steps),
        "steps_measured": len(measured),
        "device": meta.get("device"),
        "trainable_params": meta.get("trainable_params"),
        "gradient_checkpointing": meta.get("gradient_checkpointing"),
        "micro_batch_size": meta.get("micro_batch_size"),
        "load_peak_alloc_gib": max((m["load"]["peak_alloc_gib"] or 0 for m in metas),
                                   default=0) or None,
        "losses_finite": bool(steps) and all(math.isfinite(s["loss"]) for s in steps),
        "final_loss": steps[-1]["loss"] if steps else None,
    }
    evals = [r for r in records if r.get("event") == "eval_forward"]
    if evals:
        out["eval_forward_tokens_per_s"] = evals[0]["tokens_per_s"]
    if world:
        out["gpus"] = world
    if not measured:
        return out
    seconds = sum(s["step_s"] for s in measured)
    step_times = [s["step_s"] for s in measured]
    model_flops = sum(s["model_flops"] for s in measured)
    hardware_flops = sum(s["hardware_flops"] for s in measured)
    out.update({
        "tokens_per_s": sum(s["tokens"] for s in measured) / seconds,
        "tokens_per_s_median_step": statistics.median(s["tokens"] / s["step_s"]
                                                      for s in measured),
        "tokens_per_step": statistics.fmean(s["tokens"] for s in measured),
        "step_s_median": statistics.median(step_times),
        "step_s_mean": statistics.fmean(step_times),
        "step_s_max": max(step_times),
        "peak_alloc_gib": max((s["peak_alloc_gib"] or 0 for s in steps), default=0) or None,
        "peak_reserved_gib": max((s["peak_reserved_gib"] or 0 for s in steps), default=0) or None,
        "model_tflops_per_s": model_flops / seconds / 1e12,
        "mfu_pct": 100 * utilisation(model_flops, seconds, world, H100_PEAK_BF16_FLOPS),
        "mfu_pct_vs_measured": 100 * utilisation(model_flops, seconds, world,
                                                 H100_MEASURED_MATMUL_FLOPS),
        "hfu_pct": 100 * utilisation(hardware_flops, seconds, world, H100_PEAK_BF16_FLOPS),
    })
    return out


def reported_lines(log_path: Path) -> dict:
    """What a run said about itself: Unsloth's `unsloth {...}` line, the fast_steps compile
    and CUDA-graph reports (the last of each), as fields of its summary."""
    found = {}
    if not log_path.is_file():
        return found
    for line in log_path.read_text(errors="replace").splitlines():
        for marker, key in (("unsloth {", "unsloth"), ("fast_steps compile: {", "compile"),
                            ("fast_steps cuda graphs: {", "cuda_graphs")):
            if marker in line:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                    found[key] = json.loads(line[line.index(marker) + len(marker) - 1:])
    return found


def process_status(returncode: int | None, timed_out: bool) -> str | None:
    if timed_out:
        return "timeout"
    return f"failed (rc {returncode})" if returncode else None


def status_of(summary: dict, returncode: int | None, timed_out: bool) -> str:
    """Status of a training run from its exit and its figures."""
    status = process_status(returncode, timed_out)
    if status:
        return status
    if not summary.get("steps_measured"):
        return "no measured steps"
    if not summary.get("tokens_per_s"):
        return "no tokens counted"  # something replaced trainer.training_step after us
    if not summary.get("losses_finite"):
        return "loss not finite"
    return "ok"


# ----------------------------------------------------------------------------------------------
# Table

COLUMNS = (  # header, key, format
    ("variant", "variant", "{}"),
    ("status", "status", "{}"),
    ("tok/s", "tokens_per_s", "{:,.0f}"),
    ("s/step med", "step_s_median", "{:.3f}"),
    ("s/step mean", "step_s_mean", "{:.3f}"),
    ("tok/step", "tokens_per_step", "{:,.0f}"),
    ("alloc GiB", "peak_alloc_gib", "{:.1f}"),
    ("resv GiB", "peak_reserved_gib", "{:.1f}"),
    ("trainable", "trainable_params", "{:,}"),
    ("MFU%", "mfu_pct", "{:.1f}"),
    ("MFU%790", "mfu_pct_vs_measured", "{:.1f}"),
    ("HFU%", "hfu_pct", "{:.1f}"),
    ("loss", "final_loss", "{:.3f}"),
    ("gpus", "gpus", "{}"),
    ("wall s", "wall_s", "{:.0f}"),
)


def format_table(results: list[dict]) -> str:
    """Training runs as a table; scoring figures (eval runs, the notebook's forward pass) below."""
    rows = [[h for h, _, _ in COLUMNS]]
    for result in results:
        if result.get("kind") == "eval":
            continue
        rows.append(["-" if result.get(key) is None else fmt.format(result[key])
                     for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.get("eval_forward_tokens_per_s"):
            lines.append(f"{r['variant']}: forward-only pass over eval.jsonl (4-bit + adapter, "
                         f"bench's own loop): {r['eval_forward_tokens_per_s']:,.0f} tokens/s")
        if r.get("kind") == "eval":
            speeds = ", ".join(f"{label} {r[f'eval_{label}_tokens_per_s']:,.0f}"
                               for label in ("base", "adapter")
                               if r.get(f"eval_{label}_tokens_per_s"))
            lines.append(f"{r['variant']}: eval.perplexity scoring tokens/s ({r.get('eval_dtype')}"
                         f"): {speeds or '-'} [{r['status']}]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main


def plan_variants(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; known: "
                         f"{', '.join(VARIANTS)}")
    return names


def warmup_and_steps(name: str, args) -> tuple[int, int]:
    """A variant's own warm-up and measured steps (a peer with 64k-token steps runs fewer)."""
    variant = VARIANTS[name]
    return variant.get("warmup", args.warmup), variant.get("steps", args.steps)


def command_for(name: str, args, recipe: dict, sets: dict, run_dir: Path) -> tuple[list, dict]:
    """(argv, extra result fields) of one variant's run; writes the axolotl config."""
    variant = VARIANTS[name]
    kind, extra = variant["kind"], variant.get("args", [])
    max_steps = sum(warmup_and_steps(name, args))
    if kind == "unsloth":
        argv = [sys.executable, "-m", "bench.unsloth_peer", "--model", str(args.model),
                "--steps", str(max_steps), "--train-jsonl", str(args.unsloth_train),
                "--output-dir", str(run_dir / "out"), *extra]
        return argv, {"args": extra}
    if variant.get("recipe"):  # a peer's own config file instead of the recipe
        recipe = load_recipe(REPO_ROOT / variant["recipe"])
    if kind == "notebook":
        argv = [sys.executable, "-m", "bench.notebook_baseline", "--model", str(args.model),
                "--steps", str(max_steps), "--train-jsonl", str(args.notebook_train),
                "--eval-jsonl", args.notebook_eval, *extra]
        if args.cpu:
            argv += ["--compute-dtype", "fp32"]
        return argv, {"args": extra}
    if kind == "eval":
        adapter = args.eval_adapter or args.work_dir / "recipe" / "out"
        argv = [sys.executable, "-m", "eval.perplexity", "--model", str(args.model),
                "--adapter", str(adapter), "--compare", "--out", str(run_dir / "eval"),
                "--no-progress", *[a for a in extra if not (args.cpu and a == "--load-in-4bit")]]
        for data in args.eval_data:
            argv += ["--data", str(data)]
        return argv, {"args": extra, "adapter": str(adapter)}
    cfg = axolotl_config(recipe, variant.get("overrides", {}), model_dir=args.model, run_dir=run_dir,
                         prepared_dir=args.work_dir / "prepared",
                         max_steps=max_steps, cpu=args.cpu, sets=sets)
    config_path = write_recipe(cfg, run_dir / "config.yml")
    sharded = bool(cfg.get("fsdp_config") or cfg.get("deepspeed"))
    # one process runs without a launcher; FSDP/DeepSpeed need one even for one process
    launcher = "python" if args.gpus <= 1 and not sharded else args.launcher
    argv = axolotl_command("train", config_path, launcher=launcher, processes=args.gpus)
    return argv, {"recipe": variant.get("recipe") or str(args.recipe),
                  "overrides": variant.get("overrides", {}), "sets": sets}


def summarize_eval(run_dir: Path) -> dict:
    """Scoring throughput from eval.perplexity's own timing (perplexity.json)."""
    path = run_dir / EVAL_SUBDIR / PERPLEXITY_JSON
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    out = {"device": result.get("device"), "eval_dtype": result.get("dtype")}
    for label, figures in (result.get("throughput") or {}).items():
        out[f"eval_{label}_tokens_per_s"] = figures.get("tokens_per_s")
        out[f"eval_{label}_input_tokens"] = figures.get("input_tokens")
    return out


def run_variant(name: str, args, recipe: dict, sets: dict, timeout_s: float) -> dict:
    """Run one variant to completion or timeout and return its summary line."""
    kind = VARIANTS[name]["kind"]
    run_dir = args.work_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    steps_path = run_dir / "steps.jsonl"
    for old in run_dir.glob("steps.rank*.jsonl"):
        old.unlink()
    argv, fields = command_for(name, args, recipe, sets, run_dir)
    env = subprocess_env(name, steps_path, args.threads, args.gpus if kind == "axolotl" else 1,
                         axolotl=kind == "axolotl")
    profiled = os.environ.get("BENCH_PROFILE_VARIANTS")
    if profiled and name not in profiled.split(","):  # the profiler slows the rest of a run
        env.pop("BENCH_PROFILE_STEP", None)
        env.pop("BENCH_SYNC_STEP", None)
    gpus = args.gpus if kind == "axolotl" else 1
    warmup, _ = warmup_and_steps(name, args)
    if gpus == 1 and args.gpus > 1:  # the notebook and eval are single-GPU programs
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print(f"[bench] {name}: running ({kind}, {gpus} GPU, timeout {timeout_s:.0f} s)", flush=True)
    log_path = run_dir / "log.txt"
    started = time.time()
    returncode, timed_out = run_process(argv, env, log_path, timeout_s)
    wall_s = time.time() - started

    if kind == "eval":
        summary = summarize_eval(run_dir)
        status = process_status(returncode, timed_out) or (
            "ok" if summary.get("eval_adapter_tokens_per_s") else "no throughput in perplexity.json")
    else:
        records = read_records(steps_path)
        summary = summarize(records, warmup)
        summary.update(reported_lines(log_path))
        status = status_of(summary, returncode, timed_out)
        first_step = min((r["unix_time"] for r in records if r.get("event") == "step"),
                         default=None)
        summary["startup_s"] = first_step - started if first_step else None
    return {**fields, "gpus": gpus, "status": status, "wall_s": wall_s, **summary,
            "log": str(log_path), "returncode": returncode}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (bench.build_random_mistral)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated names from bench/variants.py, run in this order")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps not measured")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="JSONL file the summaries are appended to")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench-runs"),
                        help="per-run configs, logs, step records and outputs")
    parser.add_argument("--log", type=Path, default=None,
                        help="append every run's log here too (default WORK_DIR/all-runs.log)")
    parser.add_argument("--deadline-unix", type=float, default=None,
                        help="no run may go past this time (seconds since the epoch)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="deadline = now + this (if --deadline-unix is not given)")
    parser.add_argument("--run-timeout-s", type=float, default=420.0, help="cap per run")
    parser.add_argument("--estimate-s", type=float, nargs=3, default=DEFAULT_ESTIMATE_S,
                        metavar=("NOTEBOOK", "AXOLOTL", "EVAL"),
                        help="assumed cost of a run before one of its kind has finished")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs for axolotl runs (1 process "
                        "each under torchrun/accelerate; notebook and eval use one)")
    parser.add_argument("--launcher", choices=("torchrun", "accelerate"), default="torchrun")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=YAML",
                        help="override a top-level key in every generated axolotl config")
    parser.add_argument("--notebook-train", type=Path,
                        default=Path("data/prepared/seed/train.jsonl"))
    parser.add_argument("--unsloth-train", type=Path,
                        default=Path("data/prepared/clean/train.jsonl"))
    parser.add_argument("--notebook-eval", default="data/prepared/clean/eval.jsonl",
                        help="rows for the notebook run's timed forward pass ('' to skip)")
    parser.add_argument("--eval-adapter", type=Path, default=None,
                        help="adapter for eval variants (default WORK_DIR/recipe/out)")
    parser.add_argument("--eval-data", type=Path, action="append", default=[],
                        help="--data for eval.perplexity (default: its own)")
    parser.add_argument("--cpu", action="store_true", help="CPU test mode (see above)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for runs")
    parser.add_argument("--table", type=Path, default=None, help="print the table of a results "
                        "file and exit")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    return parser.parse_args(argv)


def run_all(names: list[str], args, recipe: dict, sets: dict) -> tuple[list[dict], Path]:
    """Every variant in turn under the time guard, each result appended to --results as it
    comes; (the results, the combined log)."""
    started = time.time()
    if args.deadline_unix is not None:
        deadline = args.deadline_unix
    else:
        deadline = started + args.budget_s if args.budget_s is not None else math.inf
    estimate = dict(zip(("notebook", "axolotl", "eval"), args.estimate_s, strict=True))
    estimate["unsloth"] = UNSLOTH_ESTIMATE_S
    observed: dict[str, float] = {}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    combined_log = args.log or args.work_dir / "all-runs.log"
    results = []
    for name in names:
        kind = VARIANTS[name]["kind"]
        warmup, steps = warmup_and_steps(name, args)
        base = {"variant": name, "kind": kind, "about": VARIANTS[name]["about"],
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "warmup_steps": warmup, "max_steps": warmup + steps}
        left = deadline - time.time()
        adapter = args.eval_adapter or args.work_dir / "recipe" / "out"
        if estimate[kind] > left:
            result = {**base, "status": f"skipped: budget ({max(left, 0):.0f} s left, a {kind} run "
                      f"takes ~{estimate[kind]:.0f} s)"}
        elif kind == "eval" and not (adapter / "adapter_config.json").is_file():
            result = {**base, "status": f"skipped: no adapter in {adapter} (run `recipe` first)"}
        else:
            result = {**base, **run_variant(name, args, recipe, sets,
                                            min(args.run_timeout_s, left))}
            # the slowest finished run of a kind replaces the first guess for that kind
            observed[kind] = max(observed.get(kind, 0.0), result["wall_s"])
            estimate[kind] = observed[kind]
            log_text = Path(result["log"]).read_text(errors="replace")
            with combined_log.open("a") as handle:
                handle.write(f"\n===== {name} ({result['status']}, {result['wall_s']:.0f} s) "
                             "=====\n" + log_text)
            if result["status"] != "ok":
                tail = "\n".join(log_text.splitlines()[-25:])
                print(f"[bench] {name}: last lines of {result['log']}:\n{tail}", flush=True)
        append_jsonl(args.results, result)
        results.append(result)
        figures = (f"; {result['tokens_per_s']:,.0f} tok/s, {result['step_s_median']:.3f} "
                   f"s/step, peak {result['peak_alloc_gib'] or 0:.1f} GiB"
                   if result.get("tokens_per_s") else "")
        print(f"[bench] {name}: {result['status']}"
              + (f" in {result['wall_s']:.0f} s" if "wall_s" in result else "") + figures,
              flush=True)

    return results, combined_log


def main(argv=None) -> int:
    args = parse_args(argv)

    if args.list:
        for name, variant in VARIANTS.items():
            mark = "*" if name in DEFAULT_VARIANTS else " "
            print(f"{mark} {name:15s} {variant['kind']:8s} {variant['about']}")
        print("* = default selection")
        return 0
    if args.table:
        if not args.table.is_file():
            raise UserError(f"--table {args.table}: no such file")
        results = [json.loads(line) for line in args.table.read_text().splitlines() if line]
        print(format_table(results))
        return 0
    # runs start in the repo root: make every path the user gave absolute first
    for name in ("model", "work_dir", "results", "log", "notebook_train", "eval_adapter",
                 "unsloth_train"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.eval_data = [path.resolve() for path in args.eval_data]
    if args.notebook_eval:
        args.notebook_eval = str(Path(args.notebook_eval).resolve())
    if args.model is None or not (args.model / "config.json").is_file():
        raise UserError(f"--model {args.model}: no config.json there; build one with "
                         "`python -m bench.build_random_mistral --out DIR`")
    names = plan_variants(args.variants)
    kinds = {VARIANTS[n]["kind"] for n in names}
    recipe = {}
    if "axolotl" in kinds:
        if not args.recipe.is_file():
            raise UserError(f"--recipe {args.recipe}: not found (axolotl variants need it)")
        recipe = load_recipe(args.recipe)
    if "notebook" in kinds and not args.notebook_train.is_file():
        raise UserError(f"--notebook-train {args.notebook_train}: not found; run "
                         "`python -m data_prep --mode seed`")
    sets = parse_overrides(args.sets)

    results, combined_log = run_all(names, args, recipe, sets)
    print(f"\n[bench] results appended to {args.results}; logs in {combined_log}")
    print(format_table(results))
    return EXIT_OK if all(r["status"] == "ok" or r["status"].startswith("skipped")
                          for r in results) else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(cli(main)())
