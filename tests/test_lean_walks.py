"""fast_steps_lean_walks (integrations/fast_steps/module_walks.py): a real transformers Trainer
on a small LoRA Mistral trains step for step as without it (same losses and clipped gradient
norms, bit for bit on the CPU) while its steps stop walking the module tree; train/eval still
switch every module."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from integrations.fast_steps.module_walks import install_lean_walks  # noqa: E402

STEPS = 4


def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                           max_position_embeddings=64)
    model = MistralForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                            lora_dropout=0.1))  # dropout: train/eval matter


class CountWalks:
    """Counts Module.named_modules calls (every walk of a tree goes through it) while on."""

    def __init__(self, monkeypatch):
        self.on, self.calls = False, 0
        original = torch.nn.Module.named_modules

        def named_modules(module, *args, **kwargs):
            if self.on:
                self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "named_modules", named_modules)


def train(tmp_path, lean: bool, walks: CountWalks) -> tuple[list, list, int]:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Steps(TrainerCallback):  # walks counted from step 2 on: set-up is not per step
        def on_step_begin(self, args, state, control, **kwargs):
            walks.on = state.global_step >= 1

        def on_train_end(self, args, state, control, **kwargs):
            walks.on = False

    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 128, (2, 48), generator=generator).tolist() * STEPS  # learnable
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(output_dir=str(tmp_path / f"lean-{lean}"), max_steps=STEPS,
                             per_device_train_batch_size=2, learning_rate=0.05,
                             max_grad_norm=0.1, logging_steps=1, report_to=[], seed=0,
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=lora_model(), args=args, train_dataset=data, callbacks=[Steps()])
    if lean:
        install_lean_walks(trainer)
    walks.calls = 0
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [e["loss"] for e in logs], [e["grad_norm"] for e in logs], walks.calls


def test_lean_walks_train_bit_for_bit_like_the_trainer_without_walking_the_tree(
        tmp_path, monkeypatch):
    torch.set_num_threads(1)
    walks = CountWalks(monkeypatch)
    losses, norms, plain_walks = train(tmp_path, lean=False, walks=walks)
    lean_losses, lean_norms, lean_walks = train(tmp_path, lean=True, walks=walks)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert max(norms) > 0.1  # the clipping was active
    assert lean_losses == losses and lean_norms == norms
    assert plain_walks >= 5 * (STEPS - 1)  # train, unwrap, count, clip, zero_grad per step
    assert lean_walks == 0, lean_walks


def test_train_and_eval_still_switch_every_module(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lora_model()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path),
                                                          report_to=[], use_cpu=True))
    install_lean_walks(trainer)
    modules = list(model.modules())
    model.train()
    assert all(m.training for m in modules)
    model.eval()  # Module.eval calls self.train(False): through the remembered mode
    assert not any(m.training for m in modules)
    model.train()
    assert all(m.training for m in modules)
    leaves = [m for m in modules if next(m.children(), None) is None]
    leaves[-1].eval()  # switched by other code: the next train() walks the tree again
    model.train()
    assert all(m.training for m in modules)
    # repeated calls in the same mode return the model without walking
    assert model.train() is model


def test_plugin_refuses_lean_walks_under_fsdp_in_one_line():
    from test_integrations import RECIPE_SETTINGS

    from integrations.fast_steps.plugin import settings_problems

    problems = settings_problems({**RECIPE_SETTINGS, "fsdp_config": {"fsdp_version": 2},
                                  "fast_steps_bf16_lora": False})
    assert problems == [
        "integrations.fast_steps.FastStepsPlugin: fast_steps_lean_walks clips the gradients as "
        "one process or DDP does; FSDP/DeepSpeed clip through their wrappers: set "
        "`fast_steps_lean_walks: false`"]
    assert not settings_problems({**RECIPE_SETTINGS, "fsdp_config": {"fsdp_version": 2},
                                  "fast_steps_bf16_lora": False,
                                  "fast_steps_lean_walks": False})


def test_module_walks_benchmark_times_each_walk_and_its_lean_form(tmp_path):
    """`python -m bench.module_walks`: Mistral-7B's LoRA module tree on the meta device, each
    walk timed both ways (figures, not a timed test: only that the lean form is no walk)."""
    import json

    from bench.module_walks import main

    assert main(["--repeats", "2", "--json", str(tmp_path / "walks.json")]) == 0
    result = json.loads((tmp_path / "walks.json").read_text())
    assert result["modules"] > 2500 and result["parameters"] > 700  # 32 layers, 7 LoRA each
    walked, lean = result["ms_per_call"]["walked"], result["ms_per_call"]["lean"]
    assert set(walked) == set(lean) and len(walked) == 5
    assert result["ms_per_step"]["lean"] < result["ms_per_step"]["walked"]
