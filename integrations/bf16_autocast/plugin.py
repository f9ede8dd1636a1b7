"""Axolotl plugin: train an fp32 recipe under bf16 autocast where the hardware computes bf16.

    plugins:
      - integrations.bf16_autocast.Bf16AutocastPlugin

A CPU recipe has to say `bf16: false`: Axolotl's `bf16: true` loads the whole model in bf16
(weights, LoRA and optimizer included) and the Trainer then refuses to start without a GPU.
Mixed precision is what a CPU with bf16 instructions does well: fp32 weights, gradients and
optimizer, the matrix products in bf16 (torch autocast). This plugin asks the Trainer for
exactly that (`bf16=True`, plus `use_cpu=True` without CUDA) when `bf16_autocast` allows it:

- `auto` (default): on where bf16 is native: a CPU with AMX or AVX512-BF16 (x86) or BF16 (Arm)
  instructions, or an NVIDIA GPU with bf16; elsewhere the recipe trains in fp32 as written,
  because emulated bf16 is slower than fp32;
- `true`: always (on a CPU without bf16 instructions it works, slowly);
- `false`: never.

A recipe that already sets `bf16` or `fp16` chose its precision: `auto` leaves it alone and
`true` stops with one line. The decision is printed once, when the Trainer is built.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import reported, stop_on

try:  # the plugin base class only exists where axolotl is installed
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover
    BasePlugin = object

NAME = "integrations.bf16_autocast.Bf16AutocastPlugin"
OPTION = "bf16_autocast"


@dataclass(frozen=True)
class Decision:
    autocast: bool
    use_cpu: bool
    why: str

    def training_args(self) -> dict:
        if not self.autocast:
            return {}
        return {"bf16": True, "use_cpu": True} if self.use_cpu else {"bf16": True}

    def line(self) -> str:
        precision = "bf16 autocast (fp32 weights)" if self.autocast else "fp32"
        return f"{OPTION}: training in {precision}: {self.why}"


def recipe_precision(cfg) -> str | None:
    """`bf16` or `fp16` when the recipe itself asks for half precision (or `auto`)."""
    for key in ("bf16", "fp16"):
        if cfg.get(key) is True or cfg.get(key) == "auto":
            return key
    return None


def setting(cfg) -> str | bool:
    value = cfg.get(OPTION)
    return "auto" if value is None else value


def settings_problems(cfg) -> list[str]:
    """One line per contradiction in the recipe, with the fix."""
    value = setting(cfg)
    if value not in ("auto", True, False):
        return [f"{NAME}: {OPTION}: {value!r} is not one of auto, true, false"]
    half = recipe_precision(cfg)
    if value is True and half:
        return [f"{NAME}: {OPTION}: true trains an fp32 recipe under bf16 autocast, but the recipe sets "
                f"`{half}: {str(cfg.get(half)).lower()}`: remove one of the two"]
    return []


def cpu_bf16_instructions() -> str | None:
    """The name of this CPU's native bf16 instructions, or None where bf16 would be emulated."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        import torch

        for probe, name in (("_is_amx_tile_supported", "AMX"),
                            ("_is_avx512_bf16_supported", "AVX512-BF16")):
            check = getattr(torch.cpu, probe, None)
            if check is not None and check():
                return name
        return None
    if machine in ("aarch64", "arm64"):
        cpuinfo = Path("/proc/cpuinfo")  # Linux; macOS reports no flags here: fp32
        if cpuinfo.is_file():
            for line in cpuinfo.read_text(errors="replace").splitlines():
                if line.lower().startswith("features") and "bf16" in line.split(":", 1)[-1].split():
                    return "Arm BF16"
    return None


def decide(value, recipe_half: str | None, cuda: bool, cuda_bf16: bool,
           cpu_bf16: str | None) -> Decision:
    """Whether to train under bf16 autocast, from the option, the recipe and the hardware."""
    if value is False:
        return Decision(False, False, f"{OPTION}: false")
    if recipe_half:
        return Decision(False, False, f"the recipe sets {recipe_half} itself")
    if cuda:
        if cuda_bf16 or value is True:  # an old GPU with `true`: the Trainer says why it can't
            return Decision(True, False, "the GPU computes bf16")
        return Decision(False, False, "this GPU has no bf16 (Ampere or newer needed)")
    if cpu_bf16:
        return Decision(True, True, f"this CPU has {cpu_bf16} instructions")
    if value is True:
        return Decision(True, True, f"{OPTION}: true, although this CPU has no bf16 "
                                    "instructions (emulated: slower than fp32)")
    return Decision(False, False, "this CPU has no bf16 instructions (AMX, AVX512-BF16 or Arm "
                                  "BF16), where bf16 would be slower than fp32")


def decide_here(cfg) -> Decision:
    import torch

    cuda = torch.cuda.is_available()
    return decide(setting(cfg), recipe_precision(cfg), cuda,
                  cuda and torch.cuda.is_bf16_supported(),
                  None if cuda else cpu_bf16_instructions())


class Bf16AutocastPlugin(BasePlugin):
    """See the module docstring."""

    def get_input_args(self):
        return "integrations.bf16_autocast.Bf16AutocastArgs"

    def register(self, cfg):
        with reported():
            stop_on(settings_problems(dict(cfg)))

    def get_training_args(self, cfg):
        decision = decide_here(cfg)
        # printed, not logged: Axolotl's logging shows only its own loggers' INFO lines
        print(decision.line(), file=sys.stderr, flush=True)
        return decision.training_args()
