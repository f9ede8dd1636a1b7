"""One Markdown report with charts for a fine-tuning run: losses, perplexity, generations.

Usage:
    python -m eval.report RUN_DIR [--perplexity FILE] [--generations FILE]

RUN_DIR is the axolotl output_dir (it holds the adapter). Inputs, each optional, at least one:
  trainer log   RUN_DIR/trainer_state.json or RUN_DIR/checkpoint-*/trainer_state.json, whichever
                has the highest global_step (top level wins a tie); its log_history gives the
                train loss and eval loss against the step
  perplexity    RUN_DIR/eval/perplexity.json    (python -m eval.perplexity --adapter RUN_DIR)
  generations   RUN_DIR/eval/generations.json   (python -m eval.generate --adapter RUN_DIR)
Outputs: RUN_DIR/report.md and RUN_DIR/report/{loss,perplexity}.png (matplotlib, Agg backend),
replaced atomically; it links RUN_DIR/runs/ when the run wrote TensorBoard event files.
Chain: axolotl train -> eval.perplexity --compare -> eval.generate -> eval.report.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.files import staged_dir, staged_file
from core.runs import (
    CHART_DIR,
    EVAL_SUBDIR,
    GENERATIONS_JSON,
    PERPLEXITY_JSON,
    REPORT_MD,
    TENSORBOARD_DIR,
    read_stop_record,
    trainer_state_files,
)
from eval.common import (
    ALLOW_STOPPED_HELP,
    fmt,
    load_json_object,
    refuse_stopped_run,
    script_main,
    utc_timestamp,
    write_error,
)

LOG = logging.getLogger("eval.report")

COLOURS = {"base": "#8c8c8c", "adapter": "#c0392b", "train": "#2c7fb8", "eval": "#d95f0e"}


def find_trainer_state(run_dir: Path) -> tuple[Path, dict] | None:
    """The trainer_state.json with the highest global_step (top level wins ties), or None; a
    broken one is an error naming it (the report would otherwise show an older log)."""
    best = None
    for path, is_top in trainer_state_files(run_dir):
        state = load_json_object(path, "trainer log",
                                 "delete the broken checkpoint or re-run training")
        if not isinstance(state.get("log_history"), list):
            raise UserError(f"trainer log {path} has no log_history list: it is not a Hugging "
                            "Face trainer_state.json; delete it or re-run training")
        key = (int(state.get("global_step") or 0), is_top)
        if best is None or key > best[0]:
            best = (key, path, state)
    return (best[1], best[2]) if best else None


def loss_curves(state: dict) -> dict:
    """{'train': [(step, loss)], 'eval': [(step, loss)]} from log_history."""
    train, evaluation = [], []
    for entry in state["log_history"]:
        step = entry.get("step")
        if step is None:
            continue
        if isinstance(entry.get("loss"), int | float) and math.isfinite(entry["loss"]):
            train.append((step, float(entry["loss"])))
        if isinstance(entry.get("eval_loss"), int | float) and math.isfinite(entry["eval_loss"]):
            evaluation.append((step, float(entry["eval_loss"])))
    return {"train": train, "eval": evaluation}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, marker in (("train", None), ("eval", "o")):
        if curves[name]:
            steps, losses = zip(*curves[name], strict=True)
            ax.plot(steps, losses, marker=marker, color=COLOURS[name], label=f"{name} loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per token, nats)")
    ax.set_title("Training and eval loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_perplexity(result: dict, path: Path) -> None:
    """Sliding-window perplexity and bits per byte per dataset, base next to adapter."""
    plt = _pyplot()
    labels = result["models"]
    metrics = (("sliding_ppl", "sliding-window perplexity"),
               ("corpus_bits_per_byte", "bits per byte"))
    n = len(result["datasets"])
    fig, axes = plt.subplots(1, 2, figsize=(4 + 3 * n, 4.2), dpi=120)
    width = 0.7 / len(labels)
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, label in enumerate(labels):
            values = [d["metrics"][label][key] or 0.0 for d in result["datasets"]]
            xs = [x + (i - (len(labels) - 1) / 2) * width for x in range(n)]
            bars = ax.bar(xs, values, width, label=label, color=COLOURS.get(label))
            ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8, padding=2)
        names = []
        for d in result["datasets"]:
            change = d.get("relative_change_pct", {}).get(key)
            names.append(f"{d['name']} ({d['kind']})"
                         + ("" if change is None else f"\n{change:+.1f} %"))
        ax.set_xticks(range(n), names)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_title(title + " (lower is better)")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path)
    plt.close(fig)


def _short(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}" if value < 10 else f"{value:.1f}"


def summary_lines(curves: dict | None, ppl: dict | None, gens: dict | None) -> list[str]:
    lines = []
    if curves and curves["train"]:
        first, last = curves["train"][0], curves["train"][-1]
        lines.append(f"- Train loss {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} "
                     f"(step {last[0]}).")
    if curves and curves["eval"]:
        first, last = curves["eval"][0], curves["eval"][-1]
        lines.append(f"- Eval loss {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} "
                     f"(step {last[0]}); exp(eval loss) {math.exp(first[1]):.3f} -> "
                     f"{math.exp(last[1]):.3f}.")
    if ppl:
        two = ppl["models"] == ["base", "adapter"]
        for d in ppl["datasets"]:
            m = d["metrics"]
            if two:
                change = d["relative_change_pct"]
                lines.append(
                    f"- {d['name']} ({d['kind']}): corpus perplexity "
                    f"{fmt(m['base']['corpus_ppl'])} -> {fmt(m['adapter']['corpus_ppl'])} "
                    f"({_signed(change['corpus_ppl'])}), sliding-window perplexity "
                    f"{fmt(m['base']['sliding_ppl'])} -> {fmt(m['adapter']['sliding_ppl'])} "
                    f"({_signed(change['sliding_ppl'])}), bits per byte "
                    f"{fmt(m['base']['corpus_bits_per_byte'], 4)} -> "
                    f"{fmt(m['adapter']['corpus_bits_per_byte'], 4)} "
                    f"({_signed(change['corpus_bits_per_byte'])}).")
            else:
                label = ppl["models"][0]
                lines.append(f"- {d['name']} ({d['kind']}), {label}: corpus perplexity "
                             f"{fmt(m[label]['corpus_ppl'])}, sliding-window perplexity "
                             f"{fmt(m[label]['sliding_ppl'])}, bits per byte "
                             f"{fmt(m[label]['corpus_bits_per_byte'], 4)}.")
        lines += specificity_lines(ppl)
    if gens and gens["memorisation"]["train"]:
        share = gens["memorisation"]["mean_share"]
        lines.append("- Generations: mean share of word 8-grams copied verbatim from the "
                     "training text: " + ", ".join(
                         f"{k} {'n/a' if v is None else f'{100 * v:.1f} %'}"
                         for k, v in share.items()) + ".")
    return lines


def _signed(change: float | None) -> str:
    return "n/a" if change is None else f"{change:+.1f} %"


def specificity_lines(ppl: dict) -> list[str]:
    """Held-out vs control change: did the adapter learn Shelley, or just English?"""
    if ppl["models"] != ["base", "adapter"]:
        return []
    change = {d["kind"]: [] for d in ppl["datasets"]}
    for d in ppl["datasets"]:
        value = d["relative_change_pct"]["corpus_bits_per_byte"]
        if value is not None:
            change[d["kind"]].append(value)
    if not change.get("held-out") or not change.get("control"):
        return []
    held = sum(change["held-out"]) / len(change["held-out"])
    control = sum(change["control"]) / len(change["control"])
    if held < control - 1.0:
        verdict = "the held-out Frankenstein text improved more than the control text"
    elif held > control + 1.0:
        verdict = "the control text improved more than the held-out Frankenstein text"
    else:
        verdict = "held-out and control text changed about equally (within 1 point)"
    return [f"- Held-out vs control, bits per byte: {held:+.1f} % vs {control:+.1f} %: "
            f"{verdict}."]


def render_report(run_dir: Path, sources: dict, curves, ppl, gens, charts: list[str]) -> str:
    from eval.generate import render_generation_sections
    from eval.perplexity import NOTE, render_dataset_sections

    lines = [f"# Fine-tuning report: `{run_dir}`", "", f"Generated {utc_timestamp()} by "
             "`python -m eval.report`. Sources: " + ", ".join(
                 f"{k} `{v}`" for k, v in sources.items() if v) + ".", "", "## Summary", ""]
    stopped = read_stop_record(run_dir)
    if stopped:
        lines.append(f"- **Training stopped early**: {stopped['summary']} (`stopped_early.json`); "
                     "what is reported here is not a finished run.")
    lines += summary_lines(curves, ppl, gens) or ["- (nothing measured)"]
    missing = [k for k, v in sources.items() if v is None]
    if missing:
        lines.append("- Not available: " + ", ".join(missing) + " (see `python -m eval.report "
                     "--help` for where each is read from).")
    tensorboard = tensorboard_line(run_dir)
    if curves is not None or tensorboard:
        lines += ["", "## Training", ""] + ([tensorboard, ""] if tensorboard else [])
    if curves is not None:
        if "loss.png" in charts:
            lines += [f"![loss curves]({CHART_DIR}/loss.png)", ""]
        lines += ["| step | train loss | eval loss |", "|---|---|---|"]
        train, evaluation = dict(curves["train"]), dict(curves["eval"])
        for step in table_steps(sorted(train), sorted(evaluation)):
            lines.append(f"| {step} | {_cell(train.get(step))} | {_cell(evaluation.get(step))} |")
    if ppl is not None:
        lines += ["", "## Perplexity", "", f"Model `{ppl['model']}`"
                  + (f", adapter `{ppl['adapter']}`" if ppl["adapter"] else "")
                  + f"; {ppl['device']}, {ppl['dtype']}; {ppl['tokenizer']['context_prefix']}.",
                  "", NOTE, ""]
        if "perplexity.png" in charts:
            lines += [f"![perplexity before and after]({CHART_DIR}/perplexity.png)", ""]
        lines += render_dataset_sections(ppl, level=3)
    if gens is not None:
        s = gens["settings"]
        lines += ["", "## Generations", "", f"Greedy and {s['samples']} sampled continuation(s) "
                  f"per prompt (temperature {s['temperature']}, top-p {s['top_p']}, seeds from "
                  f"{s['seed']}, up to {s['max_new_tokens']} new tokens). \"copied\" = share of "
                  "the generation's word 8-grams found verbatim in the training text "
                  "(n/a: fewer than 8 words)."]
        lines += render_generation_sections(gens, level=3)
    lines.append("")
    return "\n".join(lines)


def tensorboard_line(run_dir: Path) -> str | None:
    """Where the run's TensorBoard event files are (recipes set `use_tensorboard: true`)."""
    runs = run_dir / TENSORBOARD_DIR
    if not any(runs.glob("*/events.out.tfevents.*")):
        return None
    return (f"Every logged metric per step (loss, learning rate, grad norm, tokens/s) is in "
            f"TensorBoard: [`{runs}`]({runs.relative_to(run_dir)}/), open it with "
            f"`tensorboard --logdir {runs}` and browse http://localhost:6006.")


def table_steps(train_steps: list[int], eval_steps: list[int], rows: int = 20) -> list[int]:
    """Steps for the loss table: every eval step, the first and last, and evenly spaced train
    steps up to about `rows` rows (the chart shows every step)."""
    every = max(1, math.ceil(len(train_steps) / rows))
    keep = set(eval_steps) | set(train_steps[::every]) | set(train_steps[-1:])
    return sorted(keep)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@dataclass
class Options:
    """What `python -m eval.report` reports: its command-line options, typed."""

    run_dir: Path
    perplexity: Path | None = None
    generations: Path | None = None
    allow_stopped: bool = False
    verbose: bool = False


def parse_args(argv=None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("run_dir", type=Path, help="axolotl output_dir of the run")
    parser.add_argument("--perplexity", type=Path,
                        help=f"perplexity results (default RUN_DIR/{EVAL_SUBDIR}/{PERPLEXITY_JSON})")
    parser.add_argument("--generations", type=Path, help=f"generations (default "
                        f"RUN_DIR/{EVAL_SUBDIR}/{GENERATIONS_JSON})")
    parser.add_argument("--allow-stopped", action="store_true", help=ALLOW_STOPPED_HELP + "; "
                        "the report says it stopped")
    parser.add_argument("-v", "--verbose", action="store_true")
    return Options(**vars(parser.parse_args(argv)))


def run(args: Options) -> Path:
    run_dir = args.run_dir
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found: pass the axolotl output_dir of a run")
    refuse_stopped_run(run_dir, args.allow_stopped)
    inputs = {}
    for name, given, default, producer in (
        ("perplexity", args.perplexity, PERPLEXITY_JSON, "eval.perplexity"),
        ("generations", args.generations, GENERATIONS_JSON, "eval.generate"),
    ):
        path = given or run_dir / EVAL_SUBDIR / default
        if given and not given.is_file():
            raise UserError(f"{name} file {given} not found: check the path or drop --{name}")
        inputs[name] = (path, load_json_object(path, f"{name} results",
                                         f"re-run python -m {producer}")) if path.is_file() \
            else (None, None)
    for name, key in (("perplexity", "datasets"), ("generations", "generations")):
        path, data = inputs[name]
        if data is not None and not isinstance(data.get(key), list):
            raise UserError(f"{name} results {path} have no '{key}' list: re-run the eval script")
    state = find_trainer_state(run_dir)
    curves = loss_curves(state[1]) if state else None
    ppl, gens = inputs["perplexity"][1], inputs["generations"][1]
    sources = {"trainer log": state[0] if state else None,
               "perplexity": inputs["perplexity"][0], "generations": inputs["generations"][0]}
    if not any(sources.values()):
        raise UserError(
            f"nothing to report in {run_dir}: no trainer_state.json and no "
            f"{EVAL_SUBDIR}/{PERPLEXITY_JSON} or {EVAL_SUBDIR}/{GENERATIONS_JSON}; run axolotl "
            "train, python -m eval.perplexity and python -m eval.generate first")

    markdown_path, chart_dir = run_dir / REPORT_MD, run_dir / CHART_DIR
    try:
        # the chart folder is swapped first, then the report; nothing if anything fails
        with staged_file(markdown_path) as markdown_tmp, staged_dir(chart_dir) as staging:
            charts = []
            if curves and (curves["train"] or curves["eval"]):
                plot_losses(curves, staging / "loss.png")
                charts.append("loss.png")
            if ppl and ppl["datasets"]:
                plot_perplexity(ppl, staging / "perplexity.png")
                charts.append("perplexity.png")
            markdown = render_report(run_dir, sources, curves, ppl, gens, charts)
            markdown_tmp.write_text(markdown, encoding="utf-8")
    except OSError as err:
        raise write_error(run_dir, err) from None
    print(f"wrote {markdown_path} and {len(charts)} chart(s) in {chart_dir}: "
          + ", ".join(charts))
    return markdown_path


main = script_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
