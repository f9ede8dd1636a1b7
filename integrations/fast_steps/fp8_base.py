"""FP8 matrix products for the frozen 4-bit base weights (`fast_steps_fp8_base`).

In the recipe's step most of the GPU's time goes to the base projections' matrix products in
bf16, after each 4-bit weight is dequantised: X @ Wᵀ in the forward pass, g @ W for the input
gradient in the backward pass (the frozen weights need no gradient of their own). Hopper and
Ada GPUs multiply e4m3 FP8 matrices at twice their bf16 rate, so these products become
`torch._scaled_mm` on e4m3 operands:

    activations and gradients   cast per call, one power-of-two factor per row (token)
    weights                     one power-of-two factor per matrix, found once (frozen)
    "cached"                    the weights cast to e4m3 once when training starts and their
                                4-bit storage released (1 byte a weight instead of ~0.53):
                                the step has no 4-bit dequantisation left
    "per_step"                  dequantised from 4 bits at every use as before, then cast:
                                no extra memory

Power-of-two factors make scaling exact: the only rounding is e4m3's own (3 mantissa bits,
~3 % relative per element, averaging out over the 4,096 to 14,336 terms of each dot product).
The LoRA adapters, attention, norms and the loss stay in bf16/fp32. This changes the
arithmetic of the base model's products, so its loss is compared with the recipe's in the
bench before anything else is said about it.

How: Axolotl's LoRA kernels (axolotl/kernels/lora.py) and fused_lora.py get every base weight
through `dequantize(W or W.t(), quant_state)`. Patched, it returns for a registered weight an
`Fp8Weight`: a tensor without storage standing for the dequantised matrix (or its transpose),
whose matmul, mm and addmm_ run the FP8 product; any other operation gets the bf16 matrix.
"""

from __future__ import annotations

import weakref

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MODES = ("cached", "per_step")


def power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """The largest power of two s with amax * s <= E4M3_MAX (float32, same shape as amax)."""
    return torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax.float().clamp(min=1e-30))))


def _rows_to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = power_of_two_scale(x.abs().amax(dim=1, keepdim=True))
    return (x.float() * scale).to(E4M3), scale.reciprocal()


def _scaled_to_e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.float() * scale).to(E4M3)


def _scaled_to_e4m3_transposed(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.t().float() * scale).contiguous().to(E4M3)


def _transposed(w8: torch.Tensor) -> torch.Tensor:
    return w8.t().contiguous()


_COMPILED: dict = {}


def on_device(fn, x: torch.Tensor):
    """fn compiled into one fused kernel on a GPU (eagerly, these casts and the fp8 transpose
    are several passes over memory each, and cost more than the FP8 products save), as is
    elsewhere. Shapes are fixed by pad_to_sequence_len: one compilation per shape."""
    if not x.is_cuda:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


def to_e4m3_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows × k) in e4m3, each row scaled by its own power of two; returns it and the
    inverse factors (rows × 1, float32) that `_scaled_mm` multiplies back."""
    return on_device(_rows_to_e4m3, x)(x)


def dequantize_4bit(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The 4-bit weight as the dense (out × in) matrix: Axolotl's fast kernel on a GPU,
    bitsandbytes' own elsewhere (Axolotl's calls CUDA directly)."""
    if weight.is_cuda and REGISTRY.original is not None:
        return REGISTRY.original(weight, quant_state)
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize_4bit

    return bnb_dequantize_4bit(weight, quant_state)


class Fp8Entry:
    """One frozen base weight (out × in): its e4m3 form and the inverse of its factor."""

    def __init__(self, weight: torch.nn.Parameter, quant_state, dense: torch.Tensor, mode: str):
        self.shape = tuple(dense.shape)  # (out, in)
        self.dtype = dense.dtype
        self.scale = power_of_two_scale(dense.abs().amax())  # 0-dim float32
        self.inverse = self.scale.reciprocal()
        self._weight = weakref.ref(weight)
        self.quant_state = quant_state
        self.cached = _scaled_to_e4m3(dense, self.scale) if mode == "cached" else None
        self._inverse_rows: dict[int, torch.Tensor] = {}

    def inverse_row(self, columns: int) -> torch.Tensor:
        """The inverse factor as the (1 × columns) float32 row `_scaled_mm` takes, made once."""
        if columns not in self._inverse_rows:
            self._inverse_rows[columns] = self.inverse.reshape(1, 1).expand(1, columns).contiguous()
        return self._inverse_rows[columns]

    def e4m3(self) -> torch.Tensor:
        """The weight (out × in, row-major) in e4m3: what the forward products read."""
        if self.cached is not None:
            return self.cached
        dense = dequantize_4bit(self._weight(), self.quant_state)
        return on_device(_scaled_to_e4m3, dense)(dense, self.scale)

    def e4m3_transposed(self) -> torch.Tensor:
        """Wᵀ (in × out, row-major) in e4m3: what the input gradient's products read."""
        if self.cached is not None:
            return on_device(_transposed, self.cached)(self.cached)
        dense = dequantize_4bit(self._weight(), self.quant_state)
        return on_device(_scaled_to_e4m3_transposed, dense)(dense, self.scale)

    def dense(self) -> torch.Tensor:
        """The weight in its compute dtype (what the 4-bit dequantisation gave, up to e4m3)."""
        return self.e4m3().to(self.dtype) * self.inverse.to(self.dtype)


def fp8_product(a: torch.Tensor, entry: Fp8Entry, transposed: bool) -> torch.Tensor:
    """a (… × k) @ W_logical in a's dtype, where W_logical is Wᵀ (in × out, the forward pass) if
    transposed else W (out × in, the input gradient)."""
    shape = a.shape
    a2 = a.reshape(-1, shape[-1])
    # _scaled_mm wants its second operand column-major: Wᵀ is that view of W as stored; W
    # itself needs the transposed copy
    mat2 = entry.e4m3().t() if transposed else entry.e4m3_transposed().t()
    a8, a_inverse = to_e4m3_rows(a2.contiguous())
    columns = mat2.shape[1]
    out = torch._scaled_mm(a8, mat2, scale_a=a_inverse, scale_b=entry.inverse_row(columns),
                           out_dtype=a.dtype)
    return out.view(*shape[:-1], columns)


def _fits(a: torch.Tensor) -> bool:
    """_scaled_mm needs both dimensions of its first operand divisible by 16."""
    return a.dim() >= 2 and a.shape[-1] % 16 == 0 and a.numel() // a.shape[-1] % 16 == 0


class Fp8Weight(torch.Tensor):
    """Stands for a dequantised base weight (or its transpose) without holding it."""

    @staticmethod
    def __new__(cls, entry: Fp8Entry, transposed: bool):
        out_f, in_f = entry.shape
        shape = (in_f, out_f) if transposed else (out_f, in_f)
        device = entry.inverse.device
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=entry.dtype, device=device)
        self.entry, self.transposed = entry, transposed
        return self

    def __repr__(self):
        return f"Fp8Weight(shape={tuple(self.shape)}, transposed={self.transposed})"

    def materialize(self) -> torch.Tensor:
        dense = self.entry.dense()
        return dense.t() if self.transposed else dense

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        product = _as_product(func, args, kwargs)
        if product is not None:
            return product
        if func in (torch.Tensor.t, torch.t):
            return Fp8Weight(args[0].entry, not args[0].transposed)
        # shape queries answer from the metadata; anything reading values reaches
        # __torch_dispatch__, which hands it the bf16 matrix
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        dense_args = [a.materialize() if isinstance(a, Fp8Weight) else a for a in args]
        return func(*dense_args, **(kwargs or {}))


_MATMULS = (torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__)


def _as_product(func, args, kwargs):
    """The FP8 product for `a @ W`-shaped calls (matmul, mm, @, out.addmm_(a, W)); None for
    anything else, which then runs on the bf16 matrix."""
    if func in _MATMULS and len(args) == 2:
        a, w = args
        if isinstance(w, Fp8Weight) and not isinstance(a, Fp8Weight) and _fits(a):
            result = fp8_product(a, w.entry, w.transposed)
            out = kwargs.get("out")
            if out is not None:
                return out.copy_(result.view(out.shape))
            return result
        return None
    if func is torch.Tensor.addmm_ and len(args) == 3:
        acc, a, w = args
        if (isinstance(w, Fp8Weight) and not isinstance(a, Fp8Weight) and _fits(a)
                and kwargs.get("beta", 1) == 1):
            return acc.add_(fp8_product(a, w.entry, w.transposed), alpha=kwargs.get("alpha", 1))
    return None


class Fp8Registry:
    """The registered weights, by the id of their bitsandbytes quantisation state (the same
    object whether a kernel asks for W or W.t())."""

    def __init__(self):
        self.entries: dict[int, Fp8Entry] = {}
        self.original = None

    def dequantize(self, W, quant_state=None):
        entry = self.entries.get(id(quant_state)) if quant_state is not None else None
        if entry is None:
            return self.original(W, quant_state)
        # bitsandbytes' convention: a packed weight with a leading 1 is the transposed view
        return Fp8Weight(entry, transposed=W.dim() == 2 and W.shape[0] == 1)


REGISTRY = Fp8Registry()


def four_bit_weights(model):
    """The weight of every bitsandbytes 4-bit linear layer of the model."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is not None and hasattr(weight, "quant_type"):
            yield weight


def install_fp8_base(model, mode: str = "cached") -> int:
    """Register every 4-bit base weight and patch Axolotl's `dequantize`; returns how many.
    "cached" casts each weight to e4m3 now and releases its 4-bit storage."""
    from axolotl.kernels import lora, quantize

    if mode not in MODES:
        raise ValueError(f"fast_steps_fp8_base mode {mode!r} is not one of {', '.join(MODES)}")
    if REGISTRY.original is None:
        REGISTRY.original = quantize.dequantize
        quantize.dequantize = lora.dequantize = REGISTRY.dequantize
    count = 0
    for weight in four_bit_weights(model):
        state = weight.quant_state
        if id(state) in REGISTRY.entries:
            continue
        dense = dequantize_4bit(weight.data, state)
        REGISTRY.entries[id(state)] = Fp8Entry(weight, state, dense, mode)
        del dense
        if mode == "cached":  # the e4m3 copy replaces it; nothing reads the 4-bit bytes now
            # one element seen in the packed shape: kernels still tell W from W.t() by it
            weight.data = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(
                weight.shape)
        count += 1
    return count


def uninstall_fp8_base() -> None:
    """Axolotl's `dequantize` back, the registry emptied (tests; a cached model stays cast)."""
    from axolotl.kernels import lora, quantize

    if REGISTRY.original is not None:
        quantize.dequantize = lora.dequantize = REGISTRY.original
    REGISTRY.original = None
    REGISTRY.entries.clear()
