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

From Python (the demo, scripts): `evaluate_run(Options(target, ...))`, the options typed, returns
what evaluation.json holds (`evaluate(target, *options)` takes them as on the command line); a
bad input raises core.errors.UserError. The three parts are called with their own typed options
(`perplexity.Options`, `generate.Options`, `report.Options`), built by `plan`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.runs import (
    ADAPTER,
    BASE,
    CONTROL,
    CONTROL_CORPUS_PPL,
    CONTROL_TEXT,
    CORPUS_PPL,
    DEFAULT_EVAL_DATA,
    DEFAULT_TRAIN_DATA,
    EVALUATION_JSON,
    HELD_OUT,
    HELD_OUT_CORPUS_PPL,
    Run,
)
from eval import generate, perplexity, report
from eval.common import (
    ALLOW_STOPPED_HELP,
    NoCudaGpu,
    command_line,
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

PARTS = ("perplexity", "generate", "report")


@dataclass
class Options:
    """What `python -m eval` evaluates and how: its command-line options, typed (each field's
    flag is its name with dashes). `evaluate_run(Options(target, ...))` is the same from Python."""

    target: Path
    model: str | None = None
    load_in_4bit: bool | None = None  # None: the recipe's load_in_4bit
    data: list[Path] | None = None
    control: list[Path] | None = None
    no_control: bool = False
    train: Path | None = None
    no_memorisation: bool = False
    prompt: list[str] | None = None
    # the parts' own defaults (gen_batch_size is eval.generate's --batch-size)
    samples: int = generate.Options.samples
    max_new_tokens: int = generate.Options.max_new_tokens
    seed: int = generate.Options.seed
    gen_batch_size: int = generate.Options.batch_size
    batch_size: int = perplexity.Options.batch_size
    window: int = perplexity.Options.window
    stride: int = perplexity.Options.stride
    max_rows: int | None = None
    tokenizer: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    fp32: bool = False
    skip: str = ""
    allow_stopped: bool = False
    no_progress: bool = False
    verbose: bool = False


def parse_args(argv=None) -> Options:
    o = Options
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
    parser.add_argument("--samples", type=int, default=o.samples)
    parser.add_argument("--max-new-tokens", type=int, default=o.max_new_tokens)
    parser.add_argument("--seed", type=int, default=o.seed)
    parser.add_argument("--gen-batch-size", type=int, default=o.gen_batch_size,
                        help="generations per batch (default 0: all of a model at once)")
    parser.add_argument("--batch-size", type=int, default=o.batch_size,
                        help="perplexity windows per batch")
    parser.add_argument("--window", type=int, default=o.window)
    parser.add_argument("--stride", type=int, default=o.stride)
    parser.add_argument("--max-rows", type=int, help="score only the first N rows of each file")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--eos-token", help="override EOS (default: the recipe's special_tokens)")
    parser.add_argument("--pad-token", help="override pad (default: the recipe's special_tokens)")
    parser.add_argument("--fp32", action="store_true", help="models in fp32 on a GPU too, as on "
                        "a CPU (perplexities comparable with a CPU's; default bf16 on CUDA)")
    parser.add_argument("--skip", default=o.skip,
                        help=f"comma-separated parts to skip: {PARTS}")
    parser.add_argument("--allow-stopped", action="store_true", help=ALLOW_STOPPED_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    return Options(**vars(parser.parse_args(argv)))


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


@dataclass
class Plan:
    """What one evaluation scores, from its target (a recipe or a run) and its options."""

    run: Run
    model: str | None
    load_in_4bit: bool
    parts: list[str]
    scoring: perplexity.Options
    generation: generate.Options


def plan(o: Options) -> Plan:
    """What to evaluate, from the target and the options (no heavy imports)."""
    run = target_run(o.target)
    refuse_stopped_run(run.output_dir, o.allow_stopped)
    if not run.adapter_config.is_file():
        raise UserError(f"{run.adapter_config} not found: train first (axolotl train "
                        f"{o.target if o.target.suffix in ('.yml', '.yaml') else 'RECIPE'}), or "
                        "pass the run directory that holds the adapter")
    read_adapter_config(run.output_dir)
    skip = {p.strip() for p in o.skip.split(",") if p.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        raise UserError(f"--skip {o.skip}: unknown part(s) {sorted(unknown)}; choose from "
                        f"{', '.join(PARTS)}")
    model = o.model or run.base_model
    load_in_4bit = run.load_in_4bit if o.load_in_4bit is None else o.load_in_4bit
    common = {"model": model, "adapter": run.output_dir, "allow_stopped": o.allow_stopped,
              "load_in_4bit": load_in_4bit, "tokenizer": o.tokenizer,
              "eos_token": o.eos_token or run.eos_token, "pad_token": o.pad_token or run.pad_token}
    return Plan(
        run=run, model=model, load_in_4bit=load_in_4bit,
        parts=[p for p in PARTS if p not in skip],
        scoring=perplexity.Options(
            **common, compare=True, data=o.data or [run.eval_data],
            control=[] if o.no_control else (o.control or [CONTROL_TEXT]), window=o.window,
            stride=o.stride, batch_size=o.batch_size, max_rows=o.max_rows,
            no_progress=o.no_progress),
        generation=generate.Options(
            **common, samples=o.samples, max_new_tokens=o.max_new_tokens, seed=o.seed,
            batch_size=o.gen_batch_size, no_memorisation=o.no_memorisation,
            train=None if o.no_memorisation else (o.train or run.train_data), prompt=o.prompt),
    )


def check_before_loading(o: Options, p: Plan) -> str:
    """Every cheap check before the (slow) load; the model reference to load."""
    perplexity.check_args(p.scoring)
    generate.check_args(p.generation)
    if "perplexity" in p.parts:
        perplexity.read_datasets(p.scoring.data, p.scoring.control, o.max_rows)
    train = p.generation.train
    if "generate" in p.parts and not o.no_memorisation and not Path(train).is_file():
        raise UserError(f"training text {train} not found (for the memorisation check): "
                        "run `python -m data_prep`, pass --train FILE or --no-memorisation")
    model_ref, _ = resolve_model_arg(p.model, p.run.output_dir)
    if p.load_in_4bit and o.load_in_4bit is None:  # 4-bit because the recipe says so
        quiet_library_logs()
        try:
            resolve_device(load_in_4bit=True)
        except NoCudaGpu:
            raise UserError(f"{o.target} sets load_in_4bit: true, which needs a CUDA GPU "
                            "(bitsandbytes nf4): pass --no-load-in-4bit to evaluate in fp32 "
                            "on this CPU") from None
    return model_ref


def evaluate_run(o: Options) -> dict:
    """Score, generate and report with one model load; what evaluation.json holds."""
    started = time.perf_counter()
    p = plan(o)
    model_ref = check_before_loading(o, p)
    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    loaded = None
    if {"perplexity", "generate"} & set(p.parts):
        loaded = load_for_eval(model_ref, p.run.output_dir, p.load_in_4bit, o.tokenizer,
                               p.scoring.eos_token, p.scoring.pad_token, fp32=o.fp32)
        seconds["load"] = loaded.seconds
    for part in p.parts:
        start = time.perf_counter()
        if part == "perplexity":
            results[part] = perplexity.run(p.scoring, loaded)
        elif part == "generate":
            results[part] = generate.run(p.generation, loaded)
        else:
            report.run(report.Options(p.run.output_dir, allow_stopped=o.allow_stopped))
        seconds[part] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    summary = summarise(o, p, model_ref, results, seconds)
    write_files_atomic(p.run.eval_dir, {EVALUATION_JSON: json.dumps(summary, indent=2) + "\n"})
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total")
    gen = summary.get("generation")
    rate = f" ({gen['tokens_per_s']:,.0f} generated tokens/s)" if gen and gen["tokens_per_s"] else ""
    print(f"evaluated {p.run.output_dir} in {seconds['total']:.1f} s: {parts}{rate}")
    return summary


def summarise(o: Options, p: Plan, model_ref: str, results: dict, seconds: dict) -> dict:
    """evaluation.json: what was run, the seconds of each part, the key figures."""
    summary = {
        "schema_version": 1,
        "timestamp": utc_timestamp(),
        "target": str(o.target),
        "run_dir": str(p.run.output_dir),
        "model": model_ref,
        "load_in_4bit": p.load_in_4bit,
        "parts": p.parts,
        "commands": {  # the standalone commands that do the same work
            "perplexity": command_line("eval.perplexity", p.scoring),
            "generate": command_line("eval.generate", p.generation),
            "report": shlex.join(["python", "-m", "eval.report", str(p.run.output_dir)])},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if "perplexity" in results:
        for key, kind in ((HELD_OUT_CORPUS_PPL, HELD_OUT), (CONTROL_CORPUS_PPL, CONTROL)):
            figures = corpus_ppl(results["perplexity"], kind)
            if figures:
                summary[key] = figures
    if "generate" in results:
        summary["generation"] = results["generate"]["timing"]
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
    """`python -m eval TARGET OPTIONS...` from Python, with the command line's options: the
    evaluation.json summary; a bad input raises core.errors.UserError (its message is the
    one-line error)."""
    return evaluate_run(parse_args([str(target), *map(str, options)]))


main = script_main(parse_args, evaluate_run)


if __name__ == "__main__":
    raise SystemExit(main())
