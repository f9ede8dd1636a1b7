"""python -m demo.calibrate: the runs behind recipes/smollm2-demo-cpu.yml's training settings.

Usage:
    python -m demo.calibrate --list                 # the variants and their overrides
    python -m demo.calibrate NAME [NAME ...]         # run them, one after the other
    python -m demo.calibrate --table                 # the Markdown table of recorded results

Each variant is the demo recipe with a few keys overridden, run through the whole `python -m
demo` pipeline (prep, axolotl train, perplexity, generations, report) into
outputs/calibration/NAME/, timed end to end. One row per run is appended to
docs/demo-calibration.json: overrides -> held-out and control corpus-perplexity change,
training and whole-demo wall time, threads, and the machine's load average before and after
(the demo target is 2 cores; a busy machine inflates the times, never the perplexities).
Run one at a time: each takes about as long as `make demo`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from core.runs import (
    ADAPTER,
    BASE,
    CONTROL,
    HELD_OUT,
    PERPLEXITY_JSON,
    Run,
    newest_trainer_state,
    write_recipe,
)
from eval.pipeline import corpus_ppl

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-demo-cpu.yml"
RESULTS = REPO / "docs" / "demo-calibration.json"
OUT = Path("outputs/calibration")

# What the recipe was when most rows were run: LoRA on every linear layer, 512-token bins, fp32.
RECIPE_BEFORE_SWEEP = {"lora_target_linear": True, "lora_target_modules": None,
                       "sequence_len": 512, "bf16_autocast": False}


def lora(rank: int, learning_rate: float, steps: int, micro_batch_size: int = 2,
         **extra) -> dict:
    """Overrides of one variant: LoRA rank (alpha = 2 x rank), peak learning rate, steps, packed
    rows of 512 tokens a step (2 unless named: the recipe's value when most rows were run), on
    every linear layer unless `extra` says otherwise."""
    return {**RECIPE_BEFORE_SWEEP, "lora_r": rank, "lora_alpha": 2 * rank,
            "learning_rate": learning_rate, "max_steps": steps, "warmup_steps": 4,
            "micro_batch_size": micro_batch_size, **extra}


# the recipe's datasets with integrations.passage_start as their type
_PASSAGE_START_TRAIN = {"path": "./data/prepared/clean/train.jsonl", "ds_type": "json",
                        "type": "integrations.passage_start"}
PASSAGE_START = {"datasets": [_PASSAGE_START_TRAIN],
                 "test_datasets": [{**_PASSAGE_START_TRAIN, "split": "train",
                                    "path": "./data/prepared/clean/eval.jsonl"}]}
MLP_ONLY = {"lora_target_linear": False, "lora_target_modules": ["gate_proj", "up_proj",
                                                                 "down_proj"]}

# name -> recipe overrides. Everything not named here is the recipe as committed.
VARIANTS: dict[str, dict] = {
    # the recipe before calibration: r16 all-linear, micro-batch 2 x 512 packed, lr 1e-3 cosine
    "r16-lr1e-3-48steps": lora(16, 0.001, 48),
    "r16-lr1e-3-80steps": lora(16, 0.001, 80),
    "r16-lr2e-3-80steps": lora(16, 0.002, 80),
    "r32-lr2e-3-80steps": lora(32, 0.002, 80),
    "r16-lr3e-3-80steps": lora(16, 0.003, 80),
    "r16-lr4e-3-80steps": lora(16, 0.004, 80),
    # one model load and batched generation left more of the 15 minutes to training
    "r16-lr2e-3-100steps": lora(16, 0.002, 100),
    "r32-lr2e-3-100steps": lora(32, 0.002, 100),
    "r16-lr2e-3-140steps": lora(16, 0.002, 140),
    "r16-lr2e-3-100steps-seq1024": lora(16, 0.002, 100, sequence_len=1024, micro_batch_size=1),
    # LoRA+: the B matrices learn 16x faster than the A matrices (loraplus_lr_ratio)
    "r16-lr1e-3-loraplus16-80steps": lora(16, 0.001, 80, loraplus_lr_ratio=16),
    "r16-lr5e-4-loraplus16-80steps": lora(16, 0.0005, 80, loraplus_lr_ratio=16),
    # r32 learned less and moved the control text more than r16: a smaller rank
    "r8-lr2e-3-100steps": lora(8, 0.002, 100),
    # 3 x 512 tokens a step: more text per update, same number of updates
    "r16-lr2e-3-80steps-mb3": lora(16, 0.002, 80, micro_batch_size=3),
    # the larger batch kept the control text in place: more of it, or a higher rate with it
    "r16-lr2e-3-80steps-mb4": lora(16, 0.002, 80, micro_batch_size=4),
    "r16-lr3e-3-80steps-mb3": lora(16, 0.003, 80, micro_batch_size=3),
    # r8 kept the control text in place at 100 steps: a higher rate with it; or dropout against
    # the second epoch's memorising (training loss fell below the held-out loss there)
    "r8-lr3e-3-80steps-mb3": lora(8, 0.003, 80, micro_batch_size=3),
    "r16-lr2e-3-80steps-mb3-dropout0.1": lora(16, 0.002, 80, micro_batch_size=3,
                                              lora_dropout=0.1),
    # each passage after an EOS, as eval scores it and as the model was pretrained on documents
    "r16-lr2e-3-80steps-mb3-passage-start": lora(16, 0.002, 80, micro_batch_size=3, **PASSAGE_START),
    "r16-lr2e-3-80steps-mb3-neftune5": lora(16, 0.002, 80, micro_batch_size=3,
                                            neftune_noise_alpha=5),
    # the passage start raised the control text's perplexity too: a lower rate, or rank 8
    "r16-lr1.5e-3-80steps-mb3-passage-start": lora(16, 0.0015, 80, micro_batch_size=3, **PASSAGE_START),
    "r8-lr2e-3-80steps-mb3-passage-start": lora(8, 0.002, 80, micro_batch_size=3, **PASSAGE_START),
    # DoRA: LoRA's update split into a direction and a learned per-column magnitude
    "r16-lr2e-3-80steps-mb3-dora": lora(16, 0.002, 80, micro_batch_size=3, peft_use_dora=True),
    "r8-lr2e-3-80steps-mb3-dora": lora(8, 0.002, 80, micro_batch_size=3, peft_use_dora=True),
    # the cosine schedule ending at 10 % of the peak rate, not 0; LoRA on the MLPs only
    "r16-lr2e-3-80steps-mb3-minlr0.1": lora(16, 0.002, 80, micro_batch_size=3,
                                            cosine_min_lr_ratio=0.1),
    "r16-lr2e-3-80steps-mb3-mlp-only": lora(16, 0.002, 80, micro_batch_size=3, **MLP_ONLY),
    # the MLP-only adapter lowered the control text's perplexity: push it harder
    "r16-lr3e-3-80steps-mb3-mlp-only": lora(16, 0.003, 80, micro_batch_size=3, **MLP_ONLY),
    "r16-lr2e-3-100steps-mb3-mlp-only": lora(16, 0.002, 100, micro_batch_size=3, **MLP_ONLY),
    # the largest held-out gain (passage start) with the adapter that spared the control text
    "r16-lr2e-3-80steps-mb3-mlp-only-passage-start": lora(16, 0.002, 80, micro_batch_size=3,
                                                          **MLP_ONLY, **PASSAGE_START),
    "r16-lr2e-3-100steps-mb3-mlp-only-passage-start": lora(16, 0.002, 100, micro_batch_size=3,
                                                           **MLP_ONLY, **PASSAGE_START),
    # the recipe since the GPU sweep (demo/sweep.py): rank 128 on the MLPs, one
    # 1024-token bin a step
    "r128-mlp-only-lr7e-4-120x1024": lora(128, 0.0007, 120, micro_batch_size=1, warmup_steps=6,
                                          sequence_len=1024, **MLP_ONLY),
    # the same under bf16 autocast (integrations/bf16_autocast), faster steps on a CPU with bf16
    # instructions
    "r128-mlp-only-lr7e-4-120x1024-bf16-autocast": lora(
        128, 0.0007, 120, micro_batch_size=1, warmup_steps=6, sequence_len=1024, **MLP_ONLY,
        bf16_autocast=True),
    # and 110 steps under it: the GPU sweep's round 6 found them as good as 120
    "r128-mlp-only-lr7e-4-110x1024-bf16-autocast": lora(
        128, 0.0007, 110, micro_batch_size=1, warmup_steps=6, sequence_len=1024, **MLP_ONLY,
        bf16_autocast=True),
}


def variant_recipe(name: str) -> Path:
    out = OUT / name
    overrides = {**VARIANTS[name], "output_dir": f"./{out}",
                 "dataset_prepared_path": f"./{out}/prepared"}
    overrides["save_steps"] = overrides["max_steps"]  # one checkpoint at the end is enough here
    return write_recipe(RECIPE, REPO / out / "recipe.yml", overrides,
                        header=f"{RECIPE.name} + calibration variant {name}: {VARIANTS[name]}")


def run_variant(name: str, threads: int | None = None, demo_args: tuple[str, ...] = ()) -> dict:
    recipe = variant_recipe(name)
    log = recipe.with_name("demo.log")
    env = os.environ.copy()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "demo", "--recipe",
                               str(recipe.relative_to(REPO)), *demo_args], cwd=REPO,
                              env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    note = None if proc.returncode == 0 else f"demo exited {proc.returncode} after scoring"
    if not (recipe.parent / "eval" / PERPLEXITY_JSON).is_file():
        raise SystemExit(f"calibrate: {name} failed (exit {proc.returncode}); see {log}")
    row = record(name, demo_seconds=wall if proc.returncode == 0 else None,
                 load=[load_before[0], os.getloadavg()[0]],
                 threads=int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 0),
                 demo_args=list(demo_args), note=note)
    return row


def run_result(run: Path) -> dict:
    """What a finished, evaluated run scored: held-out and control corpus-perplexity change
    (RUN/eval/perplexity.json), the trainer's own runtime and the tokens it trained."""
    ppl = json.loads((run / "eval" / PERPLEXITY_JSON).read_text())
    held, control = corpus_ppl(ppl, HELD_OUT), corpus_ppl(ppl, CONTROL)
    newest = newest_trainer_state(run)
    history = newest[1].get("log_history") or [] if newest else []
    return {
        "held_out_change_pct": round(held["change_pct"], 2),
        "held_out_ppl": [round(held[BASE], 2), round(held[ADAPTER], 2)],
        "control_change_pct": round(control["change_pct"], 2),
        "control_ppl": [round(control[BASE], 2), round(control[ADAPTER], 2)],
        "train_loop_seconds": next((r["train_runtime"] for r in reversed(history)
                                    if "train_runtime" in r), None),
        "tokens_trained": Run.from_output_dir(run).tokens_trained(),
    }


def record(name: str, **extra) -> dict:
    """One results row from outputs/calibration/NAME: perplexities from eval/perplexity.json,
    the trainer's own runtime and token count from trainer_state.json, the whole-demo time
    from demo_summary.json when the demo finished."""
    run = REPO / OUT / name
    summary_file = run / "demo_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    row = {"name": name, "overrides": VARIANTS[name], **run_result(run),
           "train_seconds": summary.get("train_seconds"), "date": dt.date.today().isoformat()}
    demo_seconds = extra.pop("demo_seconds", None)
    row["demo_seconds"] = round(demo_seconds, 1) if demo_seconds else summary.get("demo_seconds")
    if "load" in extra:
        extra["load_average_1min"] = [round(x, 2) for x in extra.pop("load")]
    row.update({k: v for k, v in extra.items() if v is not None})
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    rows.append(row)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    return row


def override_text(value) -> str:
    """A table cell's value: dataset lists by their `type` (the paths are the recipe's own)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "type " + ", ".join(str(v.get("type")) for v in value)
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def table(rows: list[dict]) -> str:
    lines = ["| run | overrides | held-out ppl change | control change | training loop "
             "| whole demo | threads, load (1-min avg) |", "|---|---|---|---|---|---|---|"]

    def minutes(seconds):
        return "n/a" if seconds is None else f"{seconds / 60:.1f} min"

    for r in rows:
        overrides = ", ".join(f"{k} {override_text(v)}" for k, v in r["overrides"].items())
        load = r.get("load_average_1min")
        lines.append(f"| {r['name']} | {overrides} | **{r['held_out_change_pct']:+.1f} %** "
                     f"({r['held_out_ppl'][0]:.2f} → {r['held_out_ppl'][1]:.2f}) | "
                     f"{r['control_change_pct']:+.1f} % | {minutes(r.get('train_loop_seconds'))} "
                     f"| {minutes(r.get('demo_seconds'))} | {r.get('threads', 'n/a')}, "
                     + (f"{load[0]:.1f} → {load[1]:.1f}" if load else "n/a") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.calibrate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="variants to run (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--record", metavar="NAME", help="append the row of an existing "
                        "outputs/calibration/NAME run (e.g. one whose demo stopped after scoring)")
    parser.add_argument("--note", help="with --record: a remark stored in the row")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS for the run (1 keeps a shared machine from "
                             "thrashing; the perplexities do not depend on it)")
    parser.add_argument("--demo-arg", action="append", default=[],
                        help="extra argument for python -m demo (repeatable), e.g. "
                             "--demo-arg=--max-new-tokens=16")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name}: {overrides}")
    if args.record:
        print(json.dumps(record(args.record, threads=args.threads, note=args.note)))
    for name in args.names:
        print(json.dumps(run_variant(name, args.threads, tuple(args.demo_arg))), flush=True)
    if args.table:
        print(table(json.loads(RESULTS.read_text()) if RESULTS.is_file() else []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
