"""integrations.fast_steps' CUDA graphs (fast_steps_cuda_graphs): the decoder stack's training
forward and backward replayed as two graphs give what the eager layers give.

On a CPU: the packing layout in fixed buffers, the settings checks, and the routing (the first
layer runs the whole stack, the others hand its output on, evaluation stays eager) through
Axolotl's own Trainer with the stack run in one call without capture: equal to the eager
layers to 1e-6, float32 (the same operations in the same order; a skipped or doubled layer
moves the loss by order 1).

On a GPU (`-m gpu`): the same with the stack captured as CUDA graphs, 4-bit base weights, bf16
and the varlen attention (bf16 keeps 8 mantissa bits: 2e-2 relative for gradients, as in the
fused LoRA tests; the replay runs the captured kernels, so the figure is usually 0), and a
real `axolotl train` run with the option against one without it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, axolotl, repo_env, run_logged, write_recipe
from test_integrations import RECIPE_SETTINGS  # what the plugin's other parts need

from integrations.fast_steps import plugin as fast_steps
from integrations.fast_steps.cuda_graphs import padded_cu_seqlens
from integrations.fast_steps.packed_layout import packed_layout

TINY = REPO / "recipes" / "tiny-mistral-cpu.yml"
GRAPH_SETTINGS = {**RECIPE_SETTINGS, "pad_to_sequence_len": True,
                  "gradient_accumulation_steps": 1, "fast_steps_cuda_graphs": True}
# the tiny recipe as the 7B recipe runs on a GPU: 4-bit, bf16, Axolotl's LoRA kernels, varlen
CUDA_OVERRIDES = {"load_in_4bit": True, "adapter": "qlora", "bf16": True,
                  "attn_implementation": "sdpa", "sdpa_varlen": True, "sample_packing": True,
                  "pad_to_sequence_len": True, "micro_batch_size": 1,
                  "optimizer": "adamw_torch_fused", "lora_modules_to_save": None,
                  "lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True,
                  # as the 7B recipe: Axolotl keeps stock SDPA for a model with a sliding window
                  "overrides_of_model_config": {"sliding_window": None}}


def test_the_layout_buffer_holds_the_document_starts_then_the_row_length():
    # two rows of 8: documents of 3, 5 | 2, 4, 2 (positions restart at 0 in each document)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 0, 1]])
    offsets = padded_cu_seqlens(position_ids, capacity=8)
    assert offsets.tolist() == [0, 3, 8, 10, 14, 16, 16, 16, 16]
    assert offsets.dtype == torch.int32
    # the same boundaries the per-micro-batch layout finds, then empty documents
    expected = packed_layout(position_ids, "cpu").cu_seqlens.tolist()
    assert offsets[: len(expected)].tolist() == expected
    assert padded_cu_seqlens(position_ids, capacity=4) is None  # 5 documents: runs eagerly


@pytest.mark.parametrize(("change", "says"), [
    ({"pad_to_sequence_len": None}, "`pad_to_sequence_len: true`"),
    ({"gradient_accumulation_steps": 4}, "`gradient_accumulation_steps: 1`"),
    ({"gradient_checkpointing": True}, "`gradient_checkpointing: false`"),
    ({"fast_steps_packed_layout": False}, "`fast_steps_packed_layout` on"),
    ({"fast_steps_compile": True, **dict.fromkeys(fast_steps.LORA_KERNEL_KEYS, False)},
     "no `fast_steps_compile`"),
])
def test_recipe_settings_a_graph_cannot_serve_are_one_line_errors(change, says):
    from core.errors import UserError

    plugin = fast_steps.FastStepsPlugin()
    plugin.register(GRAPH_SETTINGS)
    with pytest.raises(UserError, match="fast_steps_cuda_graphs needs") as err:
        plugin.register({**GRAPH_SETTINGS, **change})
    assert says in str(err.value) and "\n" not in str(err.value)
    assert "`fast_steps_cuda_graphs: false`" in str(err.value)


def probe(tmp_path, *args: str) -> dict:
    env = repo_env()
    run = subprocess.run([sys.executable, "tests/_cuda_graphs_probe.py", str(TINY),
                          str(tmp_path), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("PROBE ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(lines[0][len("PROBE "):])


def check_probe(result: dict, loss_tolerance: float, grad_tolerance: float) -> None:
    layers = 2  # the tiny model's decoder layers
    steps = result["steps"]
    assert result["layers"] == layers and len(steps) == 3
    assert all(step["through_stack"] for step in steps), steps
    # each later micro-batch once eagerly (the stack taken away) and once through it; the
    # evaluation-mode forwards in between did not replay
    assert result["replays"] == len(steps)
    assert result["eager_training_calls"] == 1 + len(steps)
    for step in steps:
        assert step["same_parameters"] and step["lora_tensors"] == 7 * 2 * layers
        assert step["documents"] >= 2  # packed rows, several passages each
        assert step["loss_diff"] <= loss_tolerance, step
        assert step["lora_grad_diff"] <= grad_tolerance, step
    assert len({step["loss"] for step in steps}) == len(steps)  # three different micro-batches


def test_the_stack_in_one_call_gives_the_eager_layers_loss_and_gradients(tiny_model, tmp_path):
    """Axolotl's Trainer on the tiny recipe (float32, CPU): the routing without capture."""
    result = probe(tmp_path, "fast_steps_packed_layout=false", "fast_steps_bf16_lora=false")
    assert result["graphs"] is False
    check_probe(result, 1e-6, 1e-6)


@pytest.mark.gpu
def test_the_captured_stack_gives_the_eager_layers_loss_and_gradients(tiny_model, tmp_path):
    """The same on a GPU, captured as CUDA graphs, with the recipe's 4-bit, bf16 and varlen."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    overrides = [f"{k}={json.dumps(v)}" for k, v in CUDA_OVERRIDES.items()]
    result = probe(tmp_path, "--graphs", *overrides)
    assert result["graphs"] is True
    check_probe(result, 1e-3, 2e-2)


@pytest.mark.gpu
def test_axolotl_train_with_cuda_graphs_replays_every_step_after_the_first(tiny_model,
                                                                            tmp_path):
    """`axolotl train` on a GPU, with and without the option: the same losses step by step,
    and the report says every training micro-batch after the first was a replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    steps, losses = 6, {}
    env = repo_env()
    for graphs in (False, True):
        out = tmp_path / f"graphs-{graphs}"
        recipe = write_recipe(TINY, tmp_path / f"graphs-{graphs}.yml", **CUDA_OVERRIDES,
                              plugins=["integrations.recipe_guard.RecipeGuardPlugin",
                                       "integrations.fast_steps.FastStepsPlugin"],
                              fast_steps_cuda_graphs=graphs, max_steps=steps, eval_steps=None,
                              save_steps=steps, use_tensorboard=False, output_dir=str(out),
                              dataset_prepared_path=str(tmp_path / "prepared"))
        log = tmp_path / f"graphs-{graphs}.log"
        run = run_logged(axolotl("train", recipe), log, env=env)
        assert run.returncode == 0, log.read_text()[-4000:]
        state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        losses[graphs] = [row["loss"] for row in state["log_history"] if "loss" in row]
    report = json.loads((tmp_path / "graphs-True" / fast_steps.CUDA_GRAPHS_REPORT).read_text())
    assert report["replays"] == steps - 1 and report["eager_training_calls"] == 1, report
    assert len(losses[True]) == len(losses[False]) == steps, losses
    for eager, graphed in zip(losses[False], losses[True], strict=True):
        assert abs(eager - graphed) <= 1e-2 * abs(eager), losses
