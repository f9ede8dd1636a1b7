"""Evaluate a fine-tuning run with one model load: perplexity, generations, then the report.

Usage:
    python -m eval recipes/mistral-qlora.yml        # the run that recipe trained (its output_dir)
    python -m eval outputs/mistral-qlora            # a run directory (the LoRA adapter)
    python -m eval TARGET [--model M] [--load-in-4bit | --no-load-in-4bit] [--data F ...]
        [--control F ... | --no-control] [--train F | --no-memorisation] [--prompt T ...]
        [--samples 1] [--max-new-tokens 60] [--gen-batch-size 0] [--batch-size 8]
        [--skip perplexity,generate,report]

The same work and the same files as the three scripts one after the other (`eval.perplexity
--compare`, `eval.generate`, `eval.report`), but the base model and adapter are loaded once, not
twice: with a 4-bit 7B model loading is most of the time. From a recipe it reads `base_model`,
`output_dir` (the run), the first `test_datasets` path (held-out data), the first `datasets` path
(training text for the memorisation check), `load_in_4bit` and `special_tokens` (EOS/pad), so it
scores exactly what `axolotl train RECIPE` wrote. From a run directory the base model comes from
its adapter_config.json and the data from data/prepared/clean/. The control text defaults to
eval/control_passage.txt.

What a recipe's run is (its data, output and eval directories, file names, metric keys) is
defined once, in core/runs.py. Outputs: RUN/eval/perplexity.{json,md},
RUN/eval/generations.{json,md}, RUN/report.md, RUN/report/*.png and RUN/eval/evaluation.json
(what was run, the seconds of each part, and the corpus perplexity of the held-out and the
control text, base -> adapter, under `held_out_corpus_ppl` / `control_corpus_ppl`).

From Python (the demo, scripts): `evaluate(target, *options)` takes the same arguments as the
command line and returns what evaluation.json holds; a bad input raises core.errors.UserError.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from pathlib import Path

from core.errors import UserError
from core.runs import (
    ADAPTER,
    BASE,
    CONTROL,
    CONTROL_CORPUS_PPL,
    CORPUS_PPL,
    DEFAULT_EVAL_DATA,
    DEFAULT_TRAIN_DATA,
    EVALUATION_JSON,
    HELD_OUT,
    HELD_OUT_CORPUS_PPL,
    Run,
)
from eval.common import (
    ALLOW_STOPPED_HELP,
    load_for_eval,
    quiet_library_logs,
    read_adapter_config,
    refuse_stopped_run,
    resolve_device,
    resolve_model_arg,
    script_main,
    utc_timestamp,
    write_files_atomic,
)

LOG = logging.getLogger("eval.pipeline")

CONTROL_TEXT = Path(__file__).resolve().parent / "control_passage.txt"
PARTS = ("perplexity", "generate", "report")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See `python -m pydoc eval.pipeline` for what is read from a recipe.")
    parser.add_argument("target", type=Path,
                        help="an axolotl recipe (.yml) or a run directory holding the adapter")
    parser.add_argument("--model", help="base model (default: the recipe's base_model, else the "
                        "adapter's base_model_name_or_path)")
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="nf4 base weights on CUDA (default: the recipe's load_in_4bit)")
    parser.add_argument("--data", type=Path, action="append",
                        help="held-out data, repeatable (default: the recipe's first "
                        f"test_datasets path, else {DEFAULT_EVAL_DATA})")
    parser.add_argument("--control", type=Path, action="append",
                        help=f"control text, repeatable (default {CONTROL_TEXT.name})")
    parser.add_argument("--no-control", action="store_true", help="score no control text")
    parser.add_argument("--train", type=Path, help="training text for the memorisation check "
                        f"(default: the recipe's first datasets path, else {DEFAULT_TRAIN_DATA})")
    parser.add_argument("--no-memorisation", action="store_true")
    parser.add_argument("--prompt", action="append", help="generation prompt, repeatable")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-batch-size", type=int, default=0,
                        help="generations per batch (default 0: all of a model at once)")
    parser.add_argument("--batch-size", type=int, default=8, help="perplexity windows per batch")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--max-rows", type=int, help="score only the first N rows of each file")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--eos-token", help="override EOS (default: the recipe's special_tokens)")
    parser.add_argument("--pad-token", help="override pad (default: the recipe's special_tokens)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip: {PARTS}")
    parser.add_argument("--allow-stopped", action="store_true", help=ALLOW_STOPPED_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def target_run(target: Path) -> Run:
    """The run a recipe trained (its output_dir), or a bare run directory."""
    if target.suffix in (".yml", ".yaml") or target.is_file():
        if not target.is_file():
            raise UserError(f"recipe {target} not found: pass an axolotl recipe (.yml) or a run "
                            "directory")
        run = Run.from_recipe(target)
        if run.output_dir is None or not run.base_model:
            raise UserError(f"recipe {target} has no output_dir or base_model: pass the recipe "
                            "the run was trained with")
        return run
    if not target.is_dir():
        raise UserError(f"{target} not found: pass an axolotl recipe (.yml) or the run "
                        "directory (output_dir) that holds the adapter")
    return Run.from_output_dir(target)


def plan(args) -> dict:
    """What to evaluate, from the target and the flags (no heavy imports)."""
    target = args.target
    run = target_run(target)
    refuse_stopped_run(run.output_dir, args.allow_stopped)
    if not run.adapter_config.is_file():
        raise UserError(f"{run.adapter_config} not found: train first (axolotl train "
                        f"{target if target.suffix in ('.yml', '.yaml') else 'RECIPE'}), or "
                        "pass the run directory that holds the adapter")
    read_adapter_config(run.output_dir)
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        raise UserError(f"--skip {args.skip}: unknown part(s) {sorted(unknown)}; choose from "
                        f"{', '.join(PARTS)}")
    return {
        "target": str(target),
        "run": run,
        "model": args.model or run.base_model,
        "run_dir": run.output_dir,
        "load_in_4bit": run.load_in_4bit if args.load_in_4bit is None else args.load_in_4bit,
        "data": args.data or [run.eval_data],
        "control": [] if args.no_control else (args.control or [CONTROL_TEXT]),
        "train": args.train or run.train_data,
        "eos_token": args.eos_token or run.eos_token,
        "pad_token": args.pad_token or run.pad_token,
        "parts": [p for p in PARTS if p not in skip],
    }


def part_argvs(args, p: dict) -> tuple[list[str], list[str]]:
    """The eval.perplexity and eval.generate command lines this evaluation stands for."""
    common = ["--adapter", str(p["run_dir"])]
    if args.allow_stopped:
        common.append("--allow-stopped")
    if p["model"]:
        common += ["--model", p["model"]]
    if p["load_in_4bit"]:
        common.append("--load-in-4bit")
    for flag in ("tokenizer", "eos_token", "pad_token"):
        value = args.tokenizer if flag == "tokenizer" else p[flag]
        if value:
            common += [f"--{flag.replace('_', '-')}", value]
    ppl = [*common, "--compare", "--window", str(args.window), "--stride", str(args.stride),
           "--batch-size", str(args.batch_size)]
    for path in p["data"]:
        ppl += ["--data", str(path)]
    for path in p["control"]:
        ppl += ["--control", str(path)]
    if args.max_rows:
        ppl += ["--max-rows", str(args.max_rows)]
    if args.no_progress:
        ppl.append("--no-progress")
    gen = [*common, "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
           "--seed", str(args.seed), "--batch-size", str(args.gen_batch_size)]
    gen += ["--no-memorisation"] if args.no_memorisation else ["--train", str(p["train"])]
    for prompt in args.prompt or []:
        gen += ["--prompt", prompt]
    return ppl, gen


def run(args) -> dict:
    started = time.perf_counter()
    from eval import generate, perplexity, report

    p = plan(args)
    ppl_argv, gen_argv = part_argvs(args, p)
    ppl_args, gen_args = perplexity.parse_args(ppl_argv), generate.parse_args(gen_argv)
    # every cheap check before the (slow) load
    perplexity.check_args(ppl_args)
    generate.check_args(gen_args)
    if "perplexity" in p["parts"]:
        perplexity.read_datasets(ppl_args.data, ppl_args.control, ppl_args.max_rows)
    if "generate" in p["parts"] and not args.no_memorisation and not Path(p["train"]).is_file():
        raise UserError(f"training text {p['train']} not found (for the memorisation check): "
                        "run `python -m data_prep`, pass --train FILE or --no-memorisation")
    model_ref, _ = resolve_model_arg(p["model"], p["run_dir"])
    if p["load_in_4bit"] and args.load_in_4bit is None:  # 4-bit because the recipe says so
        quiet_library_logs()
        try:
            resolve_device(load_in_4bit=True)
        except UserError as err:
            if not str(err).startswith("--load-in-4bit needs a CUDA GPU"):
                raise
            raise UserError(f"{args.target} sets load_in_4bit: true, which needs a CUDA GPU "
                            "(bitsandbytes nf4): pass --no-load-in-4bit to evaluate in fp32 "
                            "on this CPU") from None

    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    loaded = None
    if {"perplexity", "generate"} & set(p["parts"]):
        loaded = load_for_eval(model_ref, p["run_dir"], p["load_in_4bit"], args.tokenizer,
                               p["eos_token"], p["pad_token"])
        seconds["load"] = loaded.seconds
    for part in p["parts"]:
        start = time.perf_counter()
        if part == "perplexity":
            results[part] = perplexity.run(ppl_args, loaded)
        elif part == "generate":
            results[part] = generate.run(gen_args, loaded)
        else:
            report.run(report.parse_args([str(p["run_dir"])]
                                         + (["--allow-stopped"] if args.allow_stopped else [])))
        seconds[part] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started

    summary = {
        "schema_version": 1,
        "timestamp": utc_timestamp(),
        "target": p["target"],
        "run_dir": str(p["run_dir"]),
        "model": model_ref,
        "load_in_4bit": p["load_in_4bit"],
        "parts": p["parts"],
        "commands": {  # the standalone commands that do the same work
            "perplexity": shlex.join(["python", "-m", "eval.perplexity", *ppl_argv]),
            "generate": shlex.join(["python", "-m", "eval.generate", *gen_argv]),
            "report": shlex.join(["python", "-m", "eval.report", str(p["run_dir"])])},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if "perplexity" in results:
        for key, kind in ((HELD_OUT_CORPUS_PPL, HELD_OUT), (CONTROL_CORPUS_PPL, CONTROL)):
            figures = corpus_ppl(results["perplexity"], kind)
            if figures:
                summary[key] = figures
    if "generate" in results:
        summary["generation"] = results["generate"]["timing"]
    write_files_atomic(p["run"].eval_dir, {EVALUATION_JSON: json.dumps(summary, indent=2) + "\n"})
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total")
    gen = summary.get("generation")
    rate = f" ({gen['tokens_per_s']:,.0f} generated tokens/s)" if gen and gen["tokens_per_s"] else ""
    print(f"evaluated {p['run_dir']} in {seconds['total']:.1f} s: {parts}{rate}")
    return summary


def corpus_ppl(perplexity_result: dict, kind: str) -> dict | None:
    """{model: corpus perplexity, ..., "change_pct": base -> adapter} of the first dataset of
    `kind` (held-out or control) in perplexity.json, or None."""
    dataset = next((d for d in perplexity_result["datasets"] if d["kind"] == kind), None)
    if dataset is None:
        return None
    figures = {m: dataset["metrics"][m][CORPUS_PPL] for m in perplexity_result["models"]}
    if {BASE, ADAPTER} <= set(figures):
        figures["change_pct"] = dataset["relative_change_pct"][CORPUS_PPL]
    return figures


def evaluate(target: Path | str, *options: str) -> dict:
    """`python -m eval TARGET OPTIONS...` from Python: the evaluation.json summary; a bad input
    raises core.errors.UserError (its message is the one-line error)."""
    return run(parse_args([str(target), *map(str, options)]))


main = script_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
