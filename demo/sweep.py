"""python -m demo.sweep: many variants of the CPU demo recipe at once, on a GPU box.

Usage:
    python -m demo.sweep --list
    python -m demo.sweep [NAME ...] [--parallel 10] [--budget-s 420] [--out DIR]
    python -m demo.sweep recipe --max-steps 2 --max-rows 2 --out /tmp/s   # a CPU smoke test

A calibration run of the demo recipe (`python -m demo.calibrate NAME`) takes about 20 minutes
on a 2-core CPU; on one GPU dozens of variants fit in a few minutes. Each variant here is
recipes/smollm2-demo-cpu.yml with a few keys overridden: `axolotl train` on it (in fp32, or
under bf16 autocast where the variant sets `bf16_autocast: true`; one process per variant, up
to --parallel at a time), then the demo's own evaluation (`python -m eval RUN --fp32`) scored in
fp32, as on the CPU, so the perplexities are comparable with the CPU calibration rows. GPU kernels
still take a slightly different training path than the CPU's, so the sweep ranks settings and
measures seed-to-seed spread; a setting worth taking is then confirmed by `make demo` on a CPU
(docs/demo.md).

Variants run in the order listed (the budget stops starting new ones after --budget-s); one
JSON line per finished variant goes to OUT/sweep.jsonl: overrides, held-out and control
corpus-perplexity change, the training loop's seconds, tokens trained. The table is printed
last, best held-out change first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.launch import axolotl_command, environment, run_logged
from core.runs import EVAL_SUBDIR, PERPLEXITY_JSON, write_recipe
from demo.calibrate import MLP_ONLY, PASSAGE_START, RECIPE, lora, run_result

# the demo recipe before this sweep: r16 on every linear layer, lr 2e-3 cosine, 80 steps of
# 3 x 512 packed tokens (the rows' recorded overrides are relative to it)
RECIPE_NOW = lora(16, 0.002, 80, micro_batch_size=3)
ATTENTION_ONLY = {"lora_target_linear": False,
                  "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def recipe_with(**changes) -> dict:
    return {**RECIPE_NOW, **changes}


def mlp_only(rank: int, learning_rate: float, **changes) -> dict:
    """LoRA on gate/up/down only, alpha = 2 x rank, 80 steps of 3 x 512 unless changed."""
    return {**lora(rank, learning_rate, 80, micro_batch_size=3), **MLP_ONLY, **changes}


# the same token slots a step as 3 x 512 over 80 steps, in 120 steps of one 1024-token bin
SEQ1024_MB1 = {"sequence_len": 1024, "micro_batch_size": 1, "max_steps": 120}


# name -> overrides, in the order they run
SWEEP: dict[str, dict] = {
    # the committed recipe: compares the GPU with the CPU rows, then the seed-to-seed spread
    "recipe": RECIPE_NOW,
    "recipe-seed1": recipe_with(seed=1),
    "recipe-seed2": recipe_with(seed=2),
    "recipe-seed3": recipe_with(seed=3),
    # CPU rows to cross-check: passage start (all linear, MLP only)
    "passage-start": recipe_with(**PASSAGE_START),
    "mlp-only-passage-start": recipe_with(**MLP_ONLY, **PASSAGE_START),
    # the optimiser: a shorter second-moment memory suits an 80-step run
    "adam-beta2-0.99": recipe_with(adam_beta2=0.99),
    "adam-beta2-0.95": recipe_with(adam_beta2=0.95),
    "weight-decay-0.1": recipe_with(weight_decay=0.1),
    "max-grad-norm-0.3": recipe_with(max_grad_norm=0.3),
    # the schedule
    "warmup-0": recipe_with(warmup_steps=0),
    "warmup-10": recipe_with(warmup_steps=10),
    "linear": recipe_with(lr_scheduler="linear"),
    "lr-2.5e-3": recipe_with(learning_rate=0.0025),
    "lr-1.5e-3-100steps": recipe_with(learning_rate=0.0015, max_steps=100),
    "lr-1.5e-3-120steps": recipe_with(learning_rate=0.0015, max_steps=120),
    "60steps": recipe_with(max_steps=60),
    # packing: longer bins waste less of each step on padding
    "seq1024-mb2-60steps": recipe_with(sequence_len=1024, micro_batch_size=2, max_steps=60),
    "seq1024-mb1-120steps": recipe_with(sequence_len=1024, micro_batch_size=1, max_steps=120),
    "grad-accum2-40steps-lr3e-3": recipe_with(gradient_accumulation_steps=2, max_steps=40,
                                              learning_rate=0.003),
    # where the adapter sits and how it is scaled
    "attention-only": recipe_with(**ATTENTION_ONLY),
    "mlp-only-r32": {**lora(32, 0.002, 80, micro_batch_size=3), **MLP_ONLY},
    "mlp-only-r64-lr1e-3": {**lora(64, 0.001, 80, micro_batch_size=3), **MLP_ONLY},
    "rslora-lr1e-3": recipe_with(peft_use_rslora=True, learning_rate=0.001),
    "r4": lora(4, 0.002, 80, micro_batch_size=3),
    "lora-dropout-0.05": recipe_with(lora_dropout=0.05),
    # passage start at gentler settings (it raised the control text at every CPU setting)
    "passage-start-lr1e-3": recipe_with(learning_rate=0.001, **PASSAGE_START),
    "passage-start-60steps": recipe_with(max_steps=60, **PASSAGE_START),
    "attention-only-passage-start": recipe_with(**ATTENTION_ONLY, **PASSAGE_START),
    "mlp-only-passage-start-lr1.5e-3": recipe_with(learning_rate=0.0015, **MLP_ONLY,
                                                   **PASSAGE_START),
    "mlp-only-passage-start-r8": {**lora(8, 0.002, 80, micro_batch_size=3), **MLP_ONLY,
                                  **PASSAGE_START},
    "mlp-only-100steps-beta2-0.99": recipe_with(max_steps=100, adam_beta2=0.99, **MLP_ONLY),
    # round 2: MLP-only adapters of higher rank (the first round's best held-out change with
    # the control text unharmed), their seed spread, and with longer bins / passage start
    "mlp-only-r32-seed1": mlp_only(32, 0.002, seed=1),
    "mlp-only-r32-seed2": mlp_only(32, 0.002, seed=2),
    "mlp-only-r32-seed3": mlp_only(32, 0.002, seed=3),
    "mlp-only-r64-lr1e-3-seed1": mlp_only(64, 0.001, seed=1),
    "mlp-only-r64-lr1e-3-seed2": mlp_only(64, 0.001, seed=2),
    "mlp-only-r64-lr1.5e-3": mlp_only(64, 0.0015),
    "mlp-only-r64-lr2e-3": mlp_only(64, 0.002),
    "mlp-only-r128-lr5e-4": mlp_only(128, 0.0005),
    "mlp-only-r128-lr1e-3": mlp_only(128, 0.001),
    "mlp-only-r32-lr2.5e-3": mlp_only(32, 0.0025),
    "mlp-only-r32-lr3e-3": mlp_only(32, 0.003),
    "mlp-only-r32-100steps": mlp_only(32, 0.002, max_steps=100),
    "mlp-only-r64-lr1e-3-100steps": mlp_only(64, 0.001, max_steps=100),
    "mlp-only-r32-passage-start": mlp_only(32, 0.002, **PASSAGE_START),
    "mlp-only-r64-lr1e-3-passage-start": mlp_only(64, 0.001, **PASSAGE_START),
    "mlp-only-r32-seq1024-mb1-120steps": mlp_only(32, 0.002, **SEQ1024_MB1),
    "mlp-only-r64-lr1e-3-seq1024-mb1-120steps": mlp_only(64, 0.001, **SEQ1024_MB1),
    "mlp-only-r32-seq1024-mb1-120steps-seed1": mlp_only(32, 0.002, seed=1, **SEQ1024_MB1),
    "mlp-only-r64-lr1e-3-seq1024-mb1-120steps-seed1": mlp_only(64, 0.001, seed=1,
                                                              **SEQ1024_MB1),
    "seq1024-mb1-120steps-seed1": recipe_with(seed=1, **SEQ1024_MB1),
    "seq1024-mb1-120steps-seed2": recipe_with(seed=2, **SEQ1024_MB1),
    "mlp-only-r32-warmup10": mlp_only(32, 0.002, warmup_steps=10),
    "mlp-only-r32-alpha32": mlp_only(32, 0.002, lora_alpha=32),
    "mlp-only-r64-alpha64-lr2e-3": mlp_only(64, 0.002, lora_alpha=64),
    # round 3: rank 64-128 MLP-only adapters in 1024-token bins, across seeds
    "r64-seq1024-seed2": mlp_only(64, 0.001, seed=2, **SEQ1024_MB1),
    "r64-seq1024-seed3": mlp_only(64, 0.001, seed=3, **SEQ1024_MB1),
    "r128-seq1024": mlp_only(128, 0.001, **SEQ1024_MB1),
    "r128-seq1024-seed1": mlp_only(128, 0.001, seed=1, **SEQ1024_MB1),
    "r128-seq1024-seed2": mlp_only(128, 0.001, seed=2, **SEQ1024_MB1),
    "r128-seq1024-seed3": mlp_only(128, 0.001, seed=3, **SEQ1024_MB1),
    "r128-seed1": mlp_only(128, 0.001, seed=1),
    "r128-seed2": mlp_only(128, 0.001, seed=2),
    "r128-lr7e-4-seq1024": mlp_only(128, 0.0007, **SEQ1024_MB1),
    "r64-lr1.5e-3-seq1024": mlp_only(64, 0.0015, **SEQ1024_MB1),
    "r64-seq1024-140steps": mlp_only(64, 0.001, **{**SEQ1024_MB1, "max_steps": 140}),
    "r128-seq1024-140steps": mlp_only(128, 0.001, **{**SEQ1024_MB1, "max_steps": 140}),
    "r64-seq1024-warmup6": mlp_only(64, 0.001, warmup_steps=6, **SEQ1024_MB1),
    "r64-seq2048-60steps": mlp_only(64, 0.001, sequence_len=2048, micro_batch_size=1,
                                    max_steps=60),
    "r64-seq1024-passage-start": mlp_only(64, 0.001, **SEQ1024_MB1, **PASSAGE_START),
    "r256-lr5e-4-seq1024": mlp_only(256, 0.0005, **SEQ1024_MB1),
    # round 4: the best of round 3 across seeds, and their neighbours
    **{f"r64-seq1024-warmup6-seed{seed}": mlp_only(64, 0.001, warmup_steps=6, seed=seed,
                                                   **SEQ1024_MB1) for seed in (1, 2, 3)},
    **{f"r128-lr7e-4-seq1024-seed{seed}": mlp_only(128, 0.0007, seed=seed, **SEQ1024_MB1)
       for seed in (1, 2, 3)},
    "r256-lr5e-4-seq1024-seed1": mlp_only(256, 0.0005, seed=1, **SEQ1024_MB1),
    "r256-lr5e-4-seq1024-seed2": mlp_only(256, 0.0005, seed=2, **SEQ1024_MB1),
    "r64-lr7e-4-seq1024": mlp_only(64, 0.0007, **SEQ1024_MB1),
    "r64-lr7e-4-seq1024-seed1": mlp_only(64, 0.0007, seed=1, **SEQ1024_MB1),
    "r128-lr5e-4-seq1024": mlp_only(128, 0.0005, **SEQ1024_MB1),
    "r128-lr5e-4-seq1024-seed1": mlp_only(128, 0.0005, seed=1, **SEQ1024_MB1),
    "r64-seq1024-warmup10": mlp_only(64, 0.001, warmup_steps=10, **SEQ1024_MB1),
    "r128-lr7e-4-seq1024-warmup6": mlp_only(128, 0.0007, warmup_steps=6, **SEQ1024_MB1),
    "r256-lr3e-4-seq1024": mlp_only(256, 0.0003, **SEQ1024_MB1),
    "r128-lr7e-4-seq1024-100steps": mlp_only(128, 0.0007, **{**SEQ1024_MB1, "max_steps": 100}),
    # round 5: the candidate (r128, 7e-4, 1024-token bins) with warmup 6 across seeds, and
    # its neighbours
    **{f"r128-lr7e-4-seq1024-warmup6-seed{seed}": mlp_only(128, 0.0007, warmup_steps=6,
                                                          seed=seed, **SEQ1024_MB1)
       for seed in (1, 2, 3)},
    "r128-lr7e-4-seq1024-warmup8": mlp_only(128, 0.0007, warmup_steps=8, **SEQ1024_MB1),
    "r128-lr6e-4-seq1024": mlp_only(128, 0.0006, **SEQ1024_MB1),
    "r128-lr6e-4-seq1024-seed1": mlp_only(128, 0.0006, seed=1, **SEQ1024_MB1),
    "r128-lr8e-4-seq1024": mlp_only(128, 0.0008, **SEQ1024_MB1),
    "r128-lr8e-4-seq1024-seed1": mlp_only(128, 0.0008, seed=1, **SEQ1024_MB1),
    "r192-lr6e-4-seq1024": mlp_only(192, 0.0006, **SEQ1024_MB1),
    "r192-lr6e-4-seq1024-seed1": mlp_only(192, 0.0006, seed=1, **SEQ1024_MB1),
    "r256-lr5e-4-seq1024-seed3": mlp_only(256, 0.0005, seed=3, **SEQ1024_MB1),
    "r256-lr5e-4-seq1024-warmup6": mlp_only(256, 0.0005, warmup_steps=6, **SEQ1024_MB1),
    "r128-lr7e-4-seq1024-110steps": mlp_only(128, 0.0007, **{**SEQ1024_MB1, "max_steps": 110}),
    "r128-lr7e-4-seq1024-130steps": mlp_only(128, 0.0007, **{**SEQ1024_MB1, "max_steps": 130}),
    "r128-lr7e-4-seq1024-warmup6-seed4": mlp_only(128, 0.0007, warmup_steps=6, seed=4,
                                                  **SEQ1024_MB1),
    "r128-lr7e-4-seq1024-seed4": mlp_only(128, 0.0007, seed=4, **SEQ1024_MB1),
    # round 6: the recipe under bf16 autocast (fp32 weights, bf16 matrix products: what a CPU
    # with bf16 instructions now trains with) across seeds, against the fp32 rows above
    **{f"bf16-autocast-seed{seed}": mlp_only(128, 0.0007, warmup_steps=6, seed=seed,
                                             bf16_autocast=True, **SEQ1024_MB1)
       for seed in (42, 1, 2, 3, 4, 5, 6, 7)},
    **{f"fp32-seed{seed}": mlp_only(128, 0.0007, warmup_steps=6, seed=seed, **SEQ1024_MB1)
       for seed in (5, 6, 7)},
    **{f"bf16-autocast-110steps-seed{seed}": mlp_only(
        128, 0.0007, warmup_steps=6, seed=seed, bf16_autocast=True,
        **{**SEQ1024_MB1, "max_steps": 110}) for seed in (42, 1, 2)},
}


def variant_recipe(name: str, out: Path, max_steps: int | None = None) -> Path:
    run_dir = out / name
    steps = max_steps or SWEEP[name]["max_steps"]
    overrides = {**SWEEP[name], "output_dir": str(run_dir), "dataset_prepared_path":
                 str(run_dir / "prepared"), "max_steps": steps, "save_steps": steps,
                 "use_tensorboard": False}
    return write_recipe(RECIPE, run_dir / "recipe.yml", overrides,
                        header=f"{RECIPE.name} + sweep variant {name}: {SWEEP[name]}")


def run_one(name: str, out: Path, threads: int, max_steps: int | None = None,
            max_rows: int | None = None) -> dict:
    """Train one variant, then score it as the demo does (in fp32); its result row."""
    recipe = variant_recipe(name, out, max_steps)
    run_dir = recipe.parent
    env = environment(OMP_NUM_THREADS=str(threads))
    log = run_dir / "run.log"
    score = [sys.executable, "-m", "eval", str(run_dir), "--fp32", "--no-progress", "--skip",
             "report", *(["--max-rows", str(max_rows)] if max_rows else [])]
    start = time.perf_counter()
    for mode, argv in (("w", axolotl_command("train", recipe, launcher="python")), ("a", score)):
        returncode, _ = run_logged(argv, log, env, mode=mode)
        if returncode:
            return {"name": name, "error": f"{argv[2]} exited {returncode}", "log": str(log)}
    ppl = json.loads((run_dir / EVAL_SUBDIR / PERPLEXITY_JSON).read_text())
    return {
        "name": name,
        "overrides": SWEEP[name],
        **run_result(run_dir),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "device": ppl.get("device"),
        "dtype": ppl.get("dtype"),
    }


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def table(rows: list[dict]) -> str:
    lines = ["| variant | held-out change | control change | train loop s | tokens |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("held_out_change_pct", 1e9)):
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['name']} | {r['held_out_change_pct']:+.2f} % | "
                     f"{r['control_change_pct']:+.2f} % | {seconds(r['train_loop_seconds'])} | "
                     f"{r['tokens_trained']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.sweep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="variants to run (default: all, in order)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--parallel", type=int, default=10, help="variants at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per variant")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no variant after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("outputs/sweep"))
    parser.add_argument("--max-steps", type=int,
                        help="every variant's steps (a quick smoke test of the sweep itself)")
    parser.add_argument("--max-rows", type=int, help="score only the first N rows of each file")
    args = parser.parse_args(argv)
    if args.list:
        for name, overrides in SWEEP.items():
            print(f"{name}: {overrides}")
        return 0
    unknown = [n for n in args.names if n not in SWEEP]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: see --list")
    names = args.names or list(SWEEP)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "sweep.jsonl"
    start = time.perf_counter()
    rows = []

    def task(name: str) -> dict | None:
        if time.perf_counter() - start > args.budget_s:
            return None
        row = run_one(name, args.out, args.threads, args.max_steps, args.max_rows)
        with open(results, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"sweep: {name} done at {time.perf_counter() - start:.0f} s: "
              f"{row.get('held_out_change_pct')} / {row.get('control_change_pct')}"
              f"{' ' + row['error'] if 'error' in row else ''}", flush=True)
        return row

    with ThreadPoolExecutor(args.parallel) as pool:
        rows = [row for row in pool.map(task, names) if row]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
