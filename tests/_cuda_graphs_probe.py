"""Training micro-batches of a recipe with the decoder stack routed through
integrations.fast_steps' GraphedStack, each compared with the same micro-batch run eagerly, in
one process, through Axolotl's own loaders and Trainer.

    python tests/_cuda_graphs_probe.py RECIPE WORK_DIR [--graphs] [KEY=YAML ...]

The Trainer is built exactly as `axolotl train` builds it (`load_cfg`, `load_datasets`,
`setup_model_and_trainer`). The first micro-batch runs eagerly (that records the shapes); then
the stack is captured (`--graphs`: as CUDA graphs; without: run in one call, which is what a
CPU can check) and each later micro-batch runs twice from the same weights: eagerly (the stack
taken away) and through the stack. An evaluation-mode forward in between must run eagerly.
Prints one JSON object: per micro-batch both losses, the largest differences of the loss and
of the LoRA gradients relative to the largest value, and the stack's counters.
tests/test_cuda_graphs.py reads it.
"""

from __future__ import annotations

import json
import sys

import yaml
from _fused_qkv_probe import relative  # this script's folder is on sys.path

PLUGINS = ["integrations.recipe_guard.RecipeGuardPlugin", "integrations.fast_steps.FastStepsPlugin"]
BATCHES = 4


def forward_backward(model, batch):
    for param in model.parameters():
        param.grad = None
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def main(argv=None) -> int:
    import torch
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    from integrations.fast_steps import plugin as fast_steps
    from integrations.fast_steps.cuda_graphs import GraphedStack

    args = list(argv if argv is not None else sys.argv[1:])
    graphs = "--graphs" in args
    recipe, work, *overrides = [a for a in args if a != "--graphs"]
    extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    # the command line's settings win over the probe's defaults (a GPU run repeats two of them)
    settings = {"pad_to_sequence_len": True, "micro_batch_size": 1, **extra}
    cfg = load_cfg(recipe, plugins=PLUGINS, use_tensorboard=False, output_dir=f"{work}/out",
                   dataset_prepared_path=f"{work}/prepared", **settings)
    meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    torch.manual_seed(0)
    trainer, model, *_ = setup_model_and_trainer(cfg, meta)
    generator = torch.Generator().manual_seed(1)  # LoRA B starts at zero, which would zero
    with torch.no_grad():                         # every A gradient: the same random B
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    stack = GraphedStack(fast_steps.LAYOUTS, graphs=graphs)
    layers = stack.install(model)
    device = next(model.parameters()).device
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append({k: v.to(device) for k, v in batch.items() if k != "length"})
        if len(batches) == BATCHES:
            break
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if cfg.get("bf16") and device.type == "cuda" else torch.autocast("cpu",
                                                                                enabled=False))
    model.train()
    with autocast:
        forward_backward(model, batches[0])  # eager: the shapes recorded
    stack.capture(torch.bfloat16 if cfg.get("bf16") and device.type == "cuda" else None)
    steps = []
    for batch in batches[1:]:
        run, stack.run = stack.run, None  # the same micro-batch eagerly...
        with autocast:
            eager_loss, eager_grads = forward_backward(model, batch)
        stack.run = run
        replays = stack.replays
        with autocast:  # ...and through the stack
            loss, grads = forward_backward(model, batch)
        lora = [n for n in eager_grads if "lora_" in n]
        steps.append({
            "eager_loss": float(eager_loss), "loss": float(loss),
            "through_stack": stack.replays == replays + 1,
            "documents": int((batch["position_ids"] == 0).sum()),
            "same_parameters": sorted(eager_grads) == sorted(grads),
            "lora_tensors": len(lora),
            "loss_diff": relative(eager_loss, loss),
            "lora_grad_diff": max(relative(eager_grads[n], grads[n]) for n in lora),
        })
        model.eval()
        with torch.no_grad(), autocast:
            model(**batch)
        model.train()
    result = {"layers": layers, "graphs": graphs, "steps": steps, **{
        k: v for k, v in stack.report().items() if k in ("replays", "eager_training_calls")}}
    print("PROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # datasets' spawn pools import this file again
    raise SystemExit(main())
