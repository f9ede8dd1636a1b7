"""Q, K and V projections with their LoRA adapters in fewer kernels than Axolotl's LoRA_QKV.

Axolotl's `lora_qkv_kernel` (axolotl/kernels/lora.py, `LoRA_QKV`) treats the three projections
one by one: per projection, X @ A in the forward, and in the backward the gradient of B
recomputes A @ Xᵀ, the gradient of A and the LoRA part of the input gradient are one matrix
product each. All three read the same X, so with one scale s for the three adapters:

    forward    XA = X @ [A_q; A_k; A_v]ᵀ                  one product instead of three
               P  = X @ W_pᵀ + s · XA_p @ B_pᵀ            per projection p, as before
    backward   G  = [g_q @ B_q, g_k @ B_k, g_v @ B_v]     written into one (T × 3r) buffer
               dA = s · Gᵀ @ X                            one product instead of three
               dB_p = s · g_pᵀ @ XA_p                     XA kept from the forward: no A @ Xᵀ
               dX = Σ_p g_p @ W_p + s · G @ [A_q; A_k; A_v]    one LoRA product instead of three

Eight fewer kernel launches per decoder layer (39 → 31, counting the two of each 4-bit
dequantisation), seven fewer passes over the layer's input and two over its input gradient.
Only the plain case is taken over: no dropout, no DoRA, no biases, one scale for the three
adapters; any other layer keeps Axolotl's function.
"""

from __future__ import annotations

import types

import torch


def _kernels():
    """Axolotl's pieces this builds on (imported late: the plugin loads without axolotl)."""
    from axolotl.kernels import lora
    from axolotl.kernels.quantize import dequantize

    return lora, dequantize


class FusedLoRAQKV(torch.autograd.Function):
    """(Q, K, V) = the three LoRA projections of X; see the module's docstring for the math."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # as Axolotl's LoRA functions: autocast kept
    def forward(ctx, X, scale, q_weight, q_quant, k_weight, k_quant, v_weight, v_quant,
                A_q, B_q, A_k, B_k, A_v, B_v):
        _, dequantize = _kernels()
        shape = X.shape
        X2 = X.reshape(-1, shape[-1])
        # in the activations' dtype, as Axolotl's function (a no-op for bf16 LoRA weights)
        A = torch.cat((A_q, A_k, A_v)).to(X.dtype)  # (3r, d)
        B_q, B_k, B_v = (B.to(X.dtype) for B in (B_q, B_k, B_v))
        rank = A_q.shape[0]
        XA = X2 @ A.t()  # (T, 3r)
        outputs = []
        for i, (weight, quant, B) in enumerate(((q_weight, q_quant, B_q),
                                                (k_weight, k_quant, B_k),
                                                (v_weight, v_quant, B_v))):
            out = X2 @ dequantize(weight.t(), quant)
            out.addmm_(XA[:, i * rank:(i + 1) * rank], B.t(), alpha=scale)
            outputs.append(out.view(*shape[:-1], -1))
        ctx.save_for_backward(X2, XA, A, B_q, B_k, B_v)
        ctx.scale, ctx.rank, ctx.shape = scale, rank, shape
        ctx.base = ((q_weight, q_quant), (k_weight, k_quant), (v_weight, v_quant))
        return tuple(outputs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, q_grad, k_grad, v_grad):
        _, dequantize = _kernels()
        X2, XA, A, B_q, B_k, B_v = ctx.saved_tensors
        s, r = ctx.scale, ctx.rank
        grads = [g.reshape(-1, g.shape[-1]) for g in (q_grad, k_grad, v_grad)]
        G = X2.new_empty(X2.shape[0], 3 * r)
        for i, (g, B) in enumerate(zip(grads, (B_q, B_k, B_v), strict=True)):
            torch.mm(g, B, out=G[:, i * r:(i + 1) * r])
        # beta=0: the empty tensors' contents are ignored, the scale costs no extra kernel
        dA = A.new_empty(A.shape).addmm_(G.t(), X2, beta=0, alpha=s)  # the 3 A gradients, stacked
        dB = [B.new_empty(B.shape).addmm_(g.t(), XA[:, i * r:(i + 1) * r], beta=0, alpha=s)
              for i, (g, B) in enumerate(zip(grads, (B_q, B_k, B_v), strict=True))]
        dX = None
        for g, (weight, quant) in zip(grads, ctx.base, strict=True):
            W = dequantize(weight, quant)  # (out, d)
            dX = torch.mm(g, W) if dX is None else dX.addmm_(g, W)
            del W
        dX.addmm_(G, A, alpha=s)
        dA_q, dA_k, dA_v = dA.split(r)
        return (dX.view(ctx.shape), None, None, None, None, None, None, None,
                dA_q, dB[0], dA_k, dB[1], dA_v, dB[2])


def plain_qkv(lora, attention) -> tuple | None:
    """The arguments FusedLoRAQKV needs for this attention module, or None when a projection
    has what the fused form does not cover (dropout, DoRA, a bias, unequal scales)."""
    parts = []
    for name in ("q_proj", "k_proj", "v_proj"):
        W, b, quant, A, B, s, lora_bias, dropout, magnitude = lora.get_lora_parameters(
            getattr(attention, name))
        dropping = dropout is not None and not isinstance(dropout, torch.nn.Identity)
        if A is None or b is not None or lora_bias is not None or magnitude is not None or dropping:
            return None
        parts.append((W, quant, A, B, s))
    scales = {p[4] for p in parts}
    ranks = {p[2].shape[0] for p in parts}
    if len(scales) != 1 or len(ranks) != 1:
        return None
    (Wq, Qq, Aq, Bq, s), (Wk, Qk, Ak, Bk, _), (Wv, Qv, Av, Bv, _) = parts
    return (s, Wq, Qq, Wk, Qk, Wv, Qv, Aq, Bq, Ak, Bk, Av, Bv)


def fused_apply_qkv(self, X: torch.Tensor, inplace: bool = True):
    """Drop-in for Axolotl's `apply_lora_qkv` (bound to each attention module as `apply_qkv`)."""
    lora, _ = _kernels()
    args = plain_qkv(lora, self)
    if args is None:  # e.g. peft's adapters disabled for a base-model pass: Axolotl's path
        return lora.apply_lora_qkv(self, X, inplace)
    return FusedLoRAQKV.apply(X, *args)


def install_fused_qkv(model) -> int:
    """Rebind every attention module whose `apply_qkv` is Axolotl's LoRA_QKV path; returns how
    many were rebound."""
    lora, _ = _kernels()
    count = 0
    for module in model.modules():
        bound = getattr(module, "apply_qkv", None)
        if getattr(bound, "__func__", None) is lora.apply_lora_qkv and plain_qkv(lora, module):
            module.apply_qkv = types.MethodType(fused_apply_qkv, module)
            count += 1
    return count
