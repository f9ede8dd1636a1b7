"""Evaluate one recipe several ways in one process, through Axolotl's own loaders and Trainer.

    python tests/_packed_eval_probe.py RECIPE ADAPTER_DIR WORK_DIR

For each case (eval_sample_packing on/off, with/without integrations.packed_eval, micro-batch
size) it builds the Trainer exactly as `axolotl train` does (`load_cfg`, `load_datasets`,
`setup_model_and_trainer`, the trained adapter as `lora_model_dir`), runs `trainer.evaluate()`
once and prints one JSON object: {case: {"eval_loss": ..., "scored_tokens": ...} or
{"error": first line}}. tests/test_packed_eval.py reads it.
"""

from __future__ import annotations

import json
import sys

PLUGIN = "integrations.packed_eval.PackedEvalPlugin"
CASES = {  # name: (eval_sample_packing, with the plugin, micro_batch_size)
    "unpacked": (False, False, 1),
    "packed": (True, False, 1),
    "unpacked+plugin": (False, True, 1),
    "packed+plugin": (True, True, 1),
    "packed+plugin mbs2": (True, True, 2),
}


def evaluate(recipe: str, adapter: str, work: str, packed: bool, plugin: bool, mbs: int):
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    plugins = ["integrations.recipe_guard.RecipeGuardPlugin"] + ([PLUGIN] if plugin else [])
    cfg = load_cfg(recipe, eval_sample_packing=packed, micro_batch_size=mbs, plugins=plugins,
                   use_tensorboard=False,  # TensorBoard would write runs/ into the working dir
                   lora_model_dir=adapter, output_dir=f"{work}/out-{packed}-{plugin}-{mbs}",
                   dataset_prepared_path=f"{work}/prepared-{packed}-{mbs}")
    meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    try:
        trainer, *_ = setup_model_and_trainer(cfg, meta)
    except SystemExit as err:  # the plugin's refusal (core.errors.UserError)
        return {"error": str(err).strip().splitlines()[0]}
    scored = sum(int((batch["labels"][..., 1:] != -100).sum())
                 for batch in trainer.get_eval_dataloader())
    return {"eval_loss": trainer.evaluate()["eval_loss"], "scored_tokens": scored}


def main(argv=None) -> int:
    recipe, adapter, work = (argv or sys.argv[1:])[:3]
    results = {name: evaluate(recipe, adapter, work, *case) for name, case in CASES.items()}
    print("PROBE " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":  # datasets' spawn pools import this file again
    raise SystemExit(main())
