"""The check's summary: summary.md (a table of the stages, then what the resumed run and the
evaluation measured) and the files written next to summary.json.

`write_outputs` writes OUT/summary.json, OUT/summary.md, OUT/logs.txt (the end of every stage's
log) and the run's perplexity.md and generations.md, all or none (core/files.py), with paths
inside the checkout shown relative to it (the summaries are committed).
"""

from __future__ import annotations

import json
from pathlib import Path

from core.files import write_files
from core.launch import CODE_ROOT
from core.runs import EVAL_SUBDIR, GENERATIONS_MD, PERPLEXITY_MD

LOG_TAIL_LINES = 60


def _fmt(value, digits=1, suffix=""):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else f"{value}{suffix}"


def _prep_line(k: dict) -> str:
    return (f"train {_fmt(k.get('train_rows'))} rows / {_fmt(k.get('train_tokens'))} tokens, "
            f"eval {_fmt(k.get('eval_rows'))} / {_fmt(k.get('eval_tokens'))}")


def _model_line(k: dict) -> str:
    return f"{k.get('kind')}: `{k.get('model')}`"


def _killed_line(k: dict) -> str:
    return (f"{k['checkpoint']} complete {k['killed_at_s']} s after start, then SIGTERM "
            f"(exit {k['exit']})")


def _training_line(k: dict) -> str:
    resumed = (f"resumed from step {_fmt(k.get('resumed_from_step'))}, "
               if "resumed_from_step" in k else "")
    evaluated = (f", eval loss {_fmt(k.get('final_eval_loss'), 4)} (step "
                 f"{k.get('final_eval_step')})" if k.get("final_eval_loss") is not None else "")
    timed = k.get("time_to_adapter") or {}
    waited = (f"; time to adapter {_fmt(timed['time_to_adapter_s'])} s ("
              + ", ".join(f"{part.removesuffix('_s').replace('_', ' ')} {_fmt(seconds)}"
                          for part, seconds in timed["parts"].items()) + ")"
              if timed.get("parts") else "")
    return (resumed + f"step {_fmt(k.get('global_step'))}/{_fmt(k.get('max_steps'))}, final "
            f"loss {_fmt(k.get('final_loss'), 4)}{evaluated}, "
            f"{_fmt(k.get('tokens_per_s_median'), 0)} tok/s (median step)" + waited)


def _evaluation_line(k: dict) -> str:
    return (f"held-out ppl {_fmt(k.get('held_out_ppl_base'), 2)} → "
            f"{_fmt(k.get('held_out_ppl_adapter'), 2)}; load {_fmt(k.get('load_s'))} s, "
            f"perplexity {_fmt(k.get('perplexity_s'))} s, generate "
            f"{_fmt(k.get('generate_s'))} s ({_fmt(k.get('generated_tokens'))} tokens, "
            f"{_fmt(k.get('generated_tokens_per_s'), 0)} tok/s), report "
            f"{_fmt(k.get('report_s'))} s")


def _merge_line(k: dict) -> str:
    return f"{_fmt(k.get('size_gb'), 2)} GB written"


def _merged_line(k: dict) -> str:
    w = k.get("weights") or {}
    kept = k.get("loss_gain_kept")
    share = w.get("delta_vs_base_mean")
    return (f"{w.get('layers', 0)} LoRA layers: merged = base + adapter up to "
            f"{w.get('stored_dtype')} rounding: {'yes' if w.get('ok') else 'NO'}; LoRA change"
            f" missed by the stored weights {_fmt(w.get('delta_missed_pct_mean'), 1)} % "
            f"(the change is {_fmt(100 * share if share else None, 2)} % of the weights); "
            f"held-out loss {_fmt(k.get('nll_merged'), 4)} merged vs "
            f"{_fmt(k.get('nll_adapter'), 4)} base + adapter vs {_fmt(k.get('nll_base'), 4)} "
            f"base ({_fmt(100 * kept if kept is not None else None, 1)} % of the gain kept), "
            f"top-1 agree {_fmt(k.get('top1_agreement'), 3)}, max |Δlogit| "
            f"{_fmt(k.get('max_abs_logit_diff'), 3)} (adapter's own effect "
            f"{_fmt(k.get('adapter_effect_max_abs'), 3)})")


def _pytest_line(k: dict) -> str:
    return (f"{k.get('passed', 0)} passed, {k.get('failures', 0) + k.get('errors', 0)} "
            f"failed, {k.get('skipped', 0)} skipped")


KEY_LINES = {"data_prep": _prep_line, "model": _model_line, "train_interrupted": _killed_line,
             "train_resumed": _training_line, "train_reference": _training_line,
             "evaluate": _evaluation_line, "merge": _merge_line, "merged_logits": _merged_line,
             "pytest": _pytest_line}


def key_figure(stage: dict) -> str:
    """The stage's key figure, one line of the table ("" before it has one)."""
    line = KEY_LINES.get(stage["name"])
    return line(stage["key"]) if line and stage["key"] else ""


def verdict(summary: dict) -> str:
    skipped = [s["name"] for s in summary["stages"] if s["status"] == "skipped"]
    if not summary["ok"]:
        return "FAILED"
    return "all stages ok" if not skipped else (
        f"every stage that ran is ok; skipped: {', '.join(skipped)}")


def render_summary(summary: dict) -> str:
    machine = summary["machine"]
    gpus = machine["gpus"]
    gpu_text = (", ".join(f"GPU {g['index']} {g['name']} ({g['memory_mib']:,} MiB)" for g in gpus)
                + f", driver {gpus[0]['driver']}") if gpus else "no NVIDIA GPU (CPU run)"
    packages = ", ".join(f"{n} {v}" for n, v in machine["packages"].items() if v)
    model = summary["model"]
    lines = [
        f"# GPU check: {verdict(summary)}",
        "",
        f"- {summary['date']}, {summary['wall_s']:.0f} s in all; commit "
        f"{machine['commit'] or 'n/a'}; {gpu_text}; {machine['cpus']} CPUs",
        f"- recipe `{summary['recipe']}`"
        + (f" with {json.dumps(summary['overrides'])}" if summary["overrides"] else "")
        + f"; model: **{model['kind']}** `{model['ref']}` ({model['note']})",
        f"- Python {machine['python']}; {packages}",
        f"- GPU lanes: interrupted/resumed run, evaluation, pytest on GPU {summary['lanes']['a']};"
        f" uninterrupted run, merge, merged check on GPU {summary['lanes']['b']}",
        "",
        "| stage | status | wall | peak GPU memory | key figure |",
        "|---|---|---|---|---|",
    ]
    for stage in summary["stages"]:
        mem = stage["peak_gpu_mib"] or stage["gpu_used_peak_mib"]
        mem_text = "n/a" if not mem else f"{mem / 1024:.1f} GiB" + (
            "" if stage["peak_gpu_mib"] else " (whole GPU)")
        status = stage["status"] + (f": {stage['note']}" if stage["note"] and
                                    stage["status"] != "ok" else "")
        lines.append(f"| {stage['title']} | {status} | {_fmt(stage['wall_s'], 0, ' s')} | "
                     f"{mem_text} | {key_figure(stage).replace('|', '/')} |")
    comparison = summary.get("resume_vs_uninterrupted")
    if comparison:
        final = comparison.get("final_loss", {})
        final_eval = comparison.get("final_eval_loss", {})
        lines += [
            "",
            "## Resumed vs uninterrupted",
            "",
            f"- training loss over {comparison.get('steps_compared')} common steps: max |Δ| "
            f"{_fmt(comparison.get('loss_max_abs_diff'), 6)} (step "
            f"{comparison.get('loss_max_abs_diff_step')}); final "
            f"{_fmt(final.get('resumed'), 4)} vs {_fmt(final.get('uninterrupted'), 4)}",
            f"- eval loss at the last step both evaluated (step {final_eval.get('step')}): "
            f"{_fmt(final_eval.get('resumed'), 4)} vs {_fmt(final_eval.get('uninterrupted'), 4)}",
            f"- final adapter: max |Δ| {_fmt(comparison.get('adapter_max_abs_diff'), 6)} (largest "
            f"weight {_fmt(comparison.get('adapter_max_abs'), 4)}, relative "
            f"{_fmt(comparison.get('adapter_max_rel_diff'), 6)})",
        ]
    ev = next(s for s in summary["stages"] if s["name"] == "evaluate")
    if ev["key"]:
        k = ev["key"]
        lines += [
            "",
            "## Evaluation time",
            "",
            f"- `python -m eval RECIPE` (loading included): {_fmt(ev['wall_s'], 0)} s "
            f"(goal ≤ {summary['goals']['evaluate_s']} s on one H100/H200 with the 4-bit 7B)",
            f"- generation of the default set: {_fmt(k.get('generate_s'))} s, "
            f"{_fmt(k.get('generated_tokens_per_s'), 0)} generated tokens/s (goal ≤ "
            f"{summary['goals']['generate_s']} s after loading)",
        ]
    lines += ["", "Commands (stage logs: `logs.txt`):", ""]
    lines += [f"- {s['name']}: `{s['command']}`" for s in summary["stages"] if s["command"]]
    lines.append("")
    return "\n".join(lines)


def write_outputs(summary: dict, out: Path, work: Path) -> list[Path]:
    """The summary's files in `out` (see the module docstring); `work` holds the run."""
    files = {
        "summary.json": json.dumps(summary, indent=2) + "\n",
        "summary.md": render_summary(summary),
    }
    tails = []
    for stage in summary["stages"]:
        if stage["log"] and Path(stage["log"]).is_file():
            lines = Path(stage["log"]).read_text(errors="replace").splitlines()
            tails.append(f"===== {stage['name']} ({stage['status']}): {stage['command']}\n"
                         + "\n".join(lines[-LOG_TAIL_LINES:]))
    files["logs.txt"] = "\n\n".join(tails) + "\n"
    for name in (PERPLEXITY_MD, GENERATIONS_MD):
        source = work / "run" / EVAL_SUBDIR / name
        if source.is_file():
            files[name] = source.read_text()
    # paths inside the checkout are shown relative to it: the summary is committed
    return write_files(out, {name: text.replace(f"{CODE_ROOT}/", "") for name, text in files.items()})

