"""The key figures of each stage, read from what the stage's command wrote.

data_prep's stats.json, the Trainer's trainer_state.json (steps, losses, tokens/s), the resumed
run against the uninterrupted one (losses step by step, the final adapters), evaluation.json,
pytest's JUnit report, and the machine itself (GPUs, package versions, commit).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from core.launch import CODE_ROOT
from core.runs import HELD_OUT_CORPUS_PPL, newest_trainer_state

PACKAGES = ("torch", "transformers", "peft", "accelerate", "axolotl", "bitsandbytes",
            "datasets", "trl", "liger-kernel", "huggingface-hub")


def prep_figures(stats: dict) -> dict:
    figures = {}
    for split in ("train", "eval"):
        part = stats.get(split) or {}
        for key in ("rows", "n_rows"):
            if key in part:
                figures[f"{split}_rows"] = part[key]
        for key in ("tokens", "n_tokens"):
            if key in part:
                figures[f"{split}_tokens"] = part[key]
    return figures


def train_rows(state: dict) -> tuple[dict[int, dict], list[int]]:
    """The logged training rows by step, and the steps logged more than once."""
    rows, twice = {}, []
    for entry in state.get("log_history", []):
        if "loss" in entry and "step" in entry:
            if entry["step"] in rows:
                twice.append(entry["step"])
            rows[entry["step"]] = entry
    return rows, twice


def train_figures(output_dir: Path) -> dict:
    found = newest_trainer_state(output_dir)  # a truncated trainer_state.json is skipped
    if not found:
        return {}
    state = found[1]
    rows, twice = train_rows(state)
    history = state.get("log_history", [])
    evals = [e for e in history if "eval_loss" in e]
    rates = [r["tokens/train_per_sec_per_gpu"] for r in rows.values()
             if isinstance(r.get("tokens/train_per_sec_per_gpu"), int | float)]
    final = next((e for e in reversed(history) if "train_runtime" in e), {})
    figures = {
        "global_step": state.get("global_step"),
        "max_steps": state.get("max_steps"),
        "final_loss": rows[max(rows)]["loss"] if rows else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_eval_step": evals[-1].get("step") if evals else None,
        "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "train_runtime_s": final.get("train_runtime"),
    }
    if twice:
        figures["steps_logged_twice"] = twice
    return figures


def compare_losses(got: dict, want: dict) -> dict:
    """Per-step training loss and the last common eval loss of two trainer states."""
    rows_got, _ = train_rows(got)
    rows_want, _ = train_rows(want)
    common = sorted(set(rows_got) & set(rows_want))
    diffs = {s: abs(rows_got[s]["loss"] - rows_want[s]["loss"]) for s in common}
    evals_got = {e["step"]: e["eval_loss"] for e in got["log_history"] if "eval_loss" in e}
    evals_want = {e["step"]: e["eval_loss"] for e in want["log_history"] if "eval_loss" in e}
    last_eval = max(set(evals_got) & set(evals_want), default=None)
    return {
        "steps_compared": len(common),
        "loss_max_abs_diff": max(diffs.values()) if diffs else None,
        "loss_max_abs_diff_step": max(diffs, key=diffs.get) if diffs else None,
        "final_loss": {"resumed": rows_got[common[-1]]["loss"] if common else None,
                       "uninterrupted": rows_want[common[-1]]["loss"] if common else None},
        "final_eval_loss": {
            "step": last_eval,
            "resumed": evals_got[last_eval] if last_eval is not None else None,
            "uninterrupted": evals_want[last_eval] if last_eval is not None else None},
        "per_step_abs_diff": {str(s): diffs[s] for s in common},
    }


def compare_adapters(a: Path, b: Path) -> dict:
    """max |a - b| over two adapter files' tensors, next to the largest weight of `b`."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return {"adapter_keys_differ": sorted(set(ta) ^ set(tb))[:10]}
    max_diff = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    scale = max(float(tb[k].float().abs().max()) for k in tb)
    return {"adapter_max_abs_diff": max_diff, "adapter_max_abs": scale,
            "adapter_max_rel_diff": max_diff / scale if scale else None}


def compare_runs(resumed: Path, reference: Path) -> dict:
    """Adapter and per-step loss differences of the resumed run against the uninterrupted one."""
    result: dict = {}
    got, want = newest_trainer_state(resumed), newest_trainer_state(reference)
    if got and want:
        result.update(compare_losses(got[1], want[1]))
    a, b = resumed / "adapter_model.safetensors", reference / "adapter_model.safetensors"
    if a.is_file() and b.is_file():
        result.update(compare_adapters(a, b))
    return result


def eval_figures(summary: dict, wall_s: float | None) -> dict:
    seconds = summary.get("seconds", {})
    gen = summary.get("generation") or {}
    ppl = summary.get(HELD_OUT_CORPUS_PPL) or {}
    return {
        "wall_s": wall_s,
        "load_s": seconds.get("load"),
        "perplexity_s": seconds.get("perplexity"),
        "generate_s": gen.get("seconds"),
        "generated_tokens": gen.get("new_tokens"),
        "generated_tokens_per_s": gen.get("tokens_per_s"),
        "report_s": seconds.get("report"),
        "held_out_ppl_base": ppl.get("base"),
        "held_out_ppl_adapter": ppl.get("adapter"),
    }


def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None][:20]
    return counts


def machine_info(gpus: list[dict]) -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CODE_ROOT,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    return {
        "gpus": gpus,
        "python": sys.version.split()[0],
        "packages": {n: version(n) for n in PACKAGES},
        "cpus": os.cpu_count(),
        "commit": commit,
    }


def gpu_slug(gpus: list[dict]) -> str:
    if not gpus:
        return "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", gpus[0]["name"].lower()).strip("-")
    return f"{len(gpus)}x-{name}" if len(gpus) > 1 else name
