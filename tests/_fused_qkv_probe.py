"""One training micro-batch of a recipe with Axolotl's LoRA QKV kernel, with and without
fast_steps_fused_lora_qkv, in one process, through Axolotl's own loaders and Trainer.

    python tests/_fused_qkv_probe.py RECIPE WORK_DIR

Both Trainers are built exactly as `axolotl train` builds them (`load_cfg`, `load_datasets`,
`setup_model_and_trainer`, so Axolotl's kernel patches and the plugin's hooks run); each takes
the same first micro-batch forward and backward from the same weights (LoRA B set to the same
random values, since its zero initialisation would make every A gradient zero). Prints one JSON
object: per case the loss, how many attention modules run the fused form and how many run
Axolotl's, and the largest difference of the fused case's loss, Q/K/V LoRA gradients and
other gradients from Axolotl's, relative to the largest value. tests/test_fused_lora.py reads it.
"""

from __future__ import annotations

import json
import sys

PLUGINS = ["integrations.recipe_guard.RecipeGuardPlugin", "integrations.fast_steps.FastStepsPlugin"]


def one_step(recipe: str, work: str, fused: bool) -> dict:
    import torch
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.kernels.lora import apply_lora_qkv
    from axolotl.train import setup_model_and_trainer

    from integrations.fast_steps.fused_lora import fused_apply_qkv

    cfg = load_cfg(recipe, plugins=PLUGINS, lora_qkv_kernel=True, fast_steps_fused_lora_qkv=fused,
                   fast_steps_packed_layout=False, fast_steps_bf16_lora=False,
                   use_tensorboard=False, output_dir=f"{work}/out-{fused}",
                   dataset_prepared_path=f"{work}/prepared")
    meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    torch.manual_seed(0)  # the LoRA A matrices' random initialisation
    trainer, model, *_ = setup_model_and_trainer(cfg, meta)
    generator = torch.Generator().manual_seed(1)  # B starts at zero, which would zero A's
    for name, param in model.named_parameters():  # gradients: the same random B for both cases
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    bound = [getattr(getattr(m, "apply_qkv", None), "__func__", None) for m in model.modules()]
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    loss = model(**{k: v for k, v in batch.items() if k != "length"}).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads,
            "fused_layers": sum(f is fused_apply_qkv for f in bound),
            "axolotl_layers": sum(f is apply_lora_qkv for f in bound)}


def relative(a, b) -> float:
    """Largest difference relative to the largest value, in float32 (bf16 inputs on a GPU)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def main(argv=None) -> int:
    recipe, work = (argv or sys.argv[1:])[:2]
    plain, fused = one_step(recipe, work, False), one_step(recipe, work, True)
    qkv = [n for n in plain["grads"] if any(f"{p}_proj.lora_" in n for p in "qkv")]
    rest = [n for n in plain["grads"] if n not in qkv]
    result = {
        "cases": {name: {"loss": float(case["loss"]), "fused_layers": case["fused_layers"],
                         "axolotl_layers": case["axolotl_layers"]}
                  for name, case in (("axolotl", plain), ("fused", fused))},
        "same_parameters": sorted(plain["grads"]) == sorted(fused["grads"]),
        "qkv_lora_tensors": len(qkv),
        "loss_diff": relative(plain["loss"], fused["loss"]),
        "qkv_grad_diff": max(relative(plain["grads"][n], fused["grads"][n]) for n in qkv),
        "other_grad_diff": max(relative(plain["grads"][n], fused["grads"][n]) for n in rest),
    }
    print("PROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # datasets' spawn pools import this file again
    raise SystemExit(main())
