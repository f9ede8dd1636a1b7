"""The Trainer's walks over the model's module tree at every step, each done once instead.

At every optimizer step the transformers Trainer, Axolotl's trainer and accelerate under them
walk the whole module tree of the model, in Python, five times: `model.train()` (in
`training_step`), `unwrap_model` (in Axolotl's `compute_loss`: accelerate looks for compiled
regions in every module), `model.num_parameters()` (the step's FLOP count for the logs),
`model.parameters()` (for the gradient clipping) and `model.zero_grad()`. A QLoRA Mistral-7B
has ~2,700 modules; the walks take tens of milliseconds of host time per step
(`python -m bench.module_walks`), and the GPU waits through them: they fall between the
steps' GPU work, where nothing is queued.

None of their answers changes while training runs, so each is computed once:
- `train(mode)` returns at once when the model is already in that mode through the same call
  (and two of its deepest modules agree, so a submodule switched by other code is noticed);
  `eval()` goes through it, so evaluation and the return to training switch for real;
- `unwrap_model(model)` answers from a cache per model and arguments;
- `num_parameters(...)` answers from a cache per arguments;
- the gradient clipping gets the list of trainable parameters (made at its first call) rather
  than a generator over every module; frozen parameters have no gradients to clip or count;
- `zero_grad()` clears the gradients of that list.
The arithmetic is untouched. Only where one process trains, or data parallel (DDP), where the
clipping is torch's own: FSDP and DeepSpeed clip through their wrappers (plugin.py checks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _leaves(model: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The first and the last module of the tree that have no children."""
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    return (leaves[0], leaves[-1]) if leaves else ()


def remember_train_mode(model: torch.nn.Module) -> None:
    """`model.train(mode)` walks the tree only when the mode changes (module docstring)."""
    original: Callable = model.train
    probes = _leaves(model)
    last = {"mode": None}

    def train(mode: bool = True):
        if (last["mode"] is mode and model.training is mode
                and all(probe.training is mode for probe in probes)):
            return model
        last["mode"] = mode
        return original(mode)

    model.train = train


def cache_results(owner, name: str) -> None:
    """`owner.name(*args, **kwargs)` computed once per distinct arguments (hashable ones)."""
    original = getattr(owner, name)
    results: dict = {}

    def cached(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in results:
            results[key] = original(*args, **kwargs)
        return results[key]

    setattr(owner, name, cached)


def trainable_parameters(model: torch.nn.Module) -> Callable[[], list[torch.Tensor]]:
    """A function returning the model's trainable parameters, listed at its first call."""
    listed: list[torch.Tensor] = []

    def get() -> list[torch.Tensor]:
        if not listed:
            listed.extend(p for p in model.parameters() if p.requires_grad)
        return listed

    return get


def zero_grad_of(params: Callable[[], list[torch.Tensor]]) -> Callable:
    """`Module.zero_grad` over the given parameters only (frozen ones never get a gradient)."""

    def zero_grad(set_to_none: bool = True) -> None:
        for p in params():  # as Module.zero_grad does for every parameter
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    return zero_grad


def install_lean_walks(trainer) -> None:
    """Each of the Trainer's per-step walks done once (module docstring)."""
    model = trainer.model
    params = trainable_parameters(model)
    remember_train_mode(model)
    cache_results(trainer.accelerator, "unwrap_model")
    # the FLOP count calls the transformers model's own num_parameters (peft forwards to it)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "num_parameters"):
        cache_results(base, "num_parameters")

    def clip_grad_norm(_model):
        return trainer.accelerator.clip_grad_norm_(params(), trainer.args.max_grad_norm)

    trainer._clip_grad_norm = clip_grad_norm
    model.zero_grad = zero_grad_of(params)
