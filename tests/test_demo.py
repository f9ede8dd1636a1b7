"""make demo, shortened: the same `python -m demo` code path (data prep, SmolLM2 cache, a real
`axolotl train`, perplexity, generations, report) with 6 training steps and fewer eval rows."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO


@pytest.mark.slow
def test_shortened_demo_trains_improves_and_reports(short_demo_log):
    out = short_demo_log.output_dir
    text = short_demo_log.log.read_text()
    assert short_demo_log.returncode == 0, text[-4000:]

    # a real axolotl run wrote the adapter
    assert (out / "adapter_model.safetensors").stat().st_size > 1_000_000
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-demo-cpu.yml").read_text())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == recipe["lora_r"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    # held-out perplexity went down; the control passage was scored too
    summary = json.loads((out / "demo_summary.json").read_text())
    held = summary["held_out_corpus_ppl"]
    assert held["adapter"] < held["base"], held
    assert summary["control_corpus_ppl"]["base"] > 1
    assert summary["tokens_trained"] > 1000

    # the recipe's bf16_autocast plugin printed its decision for this machine, and the Trainer
    # ran with it (its saved arguments), as the summary says
    from integrations.bf16_autocast.plugin import decide_here

    decision = decide_here(recipe)
    assert decision.line() in text
    args = torch.load(out / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert args.bf16 == decision.autocast
    assert summary["training_precision"] == ("bf16 autocast (fp32 weights)" if decision.autocast
                                             else "fp32")

    # report files, and the summary printed last
    for name in ("report.md", "report/loss.png", "report/perplexity.png",
                 "eval/perplexity.json", "eval/generations.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "I'm afraid I've created a" in report

    # training curves for TensorBoard (the recipe's use_tensorboard), linked from the report
    events = list((out / "runs").glob("*/events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0, events
    assert f"tensorboard --logdir {out / 'runs'}" in report
    tail = text.strip().splitlines()
    tail = tail[len(tail) - 1 - tail[::-1].index("=== demo summary ==="):]
    assert tail[1].startswith("held-out Frankenstein perplexity:")
    assert any(line.startswith("whole demo:") for line in tail), tail
    assert summary["demo_seconds"] > summary["train_seconds"] > 0
    assert tail[-1].startswith("report:") and tail[-1].endswith("report.md")
