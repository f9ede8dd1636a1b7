"""FLOP accounting for LoRA/QLoRA training steps of a Llama/Mistral-shaped decoder, and MFU.

The formula (one place, used by every benchmark here; the README repeats it):

    N_lin   dense parameters of all linear layers = L * (q + k + v + o + gate + up + down) + lm_head
            (from the config, so 4-bit packing of the stored weights does not change it;
            the embedding lookup and the norms do no matmul work and are left out)
    N_lm    lm_head parameters (d_model * vocab)
    N_lora  trainable LoRA parameters (sum of r * (d_in + d_out) over adapted modules)
    A       attention width summed over layers = L * n_heads * head_dim
    P       attended (query, key) pairs in the step: per document of length n (rows split at
            padding and, with sample packing, at document boundaries), sum_i min(i, window)

    per token, frozen base + LoRA:
        forward                 2 N_lin + 2 N_lora
        backward                2 N_lin              (input gradients only: base weights frozen)
                                + 4 N_lora           (LoRA input and weight gradients)
        recompute (grad. ckpt)  2 (N_lin - N_lm) + 2 N_lora   (decoder layers run forward again)
    per attended pair:
        forward 4 A (QK^T and PV), backward 8 A, recompute 4 A

    model FLOPs    = tokens * (4 N_lin + 6 N_lora) + 12 A P
    hardware FLOPs = model FLOPs + [grad. ckpt] (tokens * (2 (N_lin - N_lm) + 2 N_lora) + 4 A P)

MFU = model FLOPs / (time * peak); HFU counts hardware FLOPs instead. Padding tokens, 4-bit
dequantisation, norms, activations, the loss and the optimizer are not counted. Peak: H100 SXM
dense bf16 989.4 TFLOP/s (datasheet) and 790 TFLOP/s (the bf16 8192^3 matmul measured on the
benchmark machine), per GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

H100_PEAK_BF16_FLOPS = 989.4e12
H100_MEASURED_MATMUL_FLOPS = 790e12


@dataclass(frozen=True)
class DecoderShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """From a transformers config (or anything with the same attributes)."""
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None)
            or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            sliding_window=getattr(config, "sliding_window", None),
        )

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def linear_params(self) -> int:
        """N_lin: dense parameters of every linear layer, lm_head included."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_attention_heads * hd * 2 + d * self.num_key_value_heads * hd * 2
        mlp = 3 * d * self.intermediate_size
        return self.num_hidden_layers * (attn + mlp) + self.lm_head_params

    @property
    def attention_width(self) -> int:
        """A: n_heads * head_dim summed over layers."""
        return self.num_hidden_layers * self.num_attention_heads * self.head_dim


def causal_pairs(length: int, window: int | None = None) -> int:
    """Attended (query, key) pairs of one causal document: sum_{i=1..n} min(i, window)."""
    if window is None or length <= window:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def step_flops(shape: DecoderShape, tokens: int, attn_pairs: int, lora_params: int,
               gradient_checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one optimizer step over `tokens` real tokens."""
    n_lin, n_lm, a = shape.linear_params, shape.lm_head_params, shape.attention_width
    model = tokens * (4 * n_lin + 6 * lora_params) + 12 * a * attn_pairs
    hardware = model
    if gradient_checkpointing:
        hardware += tokens * (2 * (n_lin - n_lm) + 2 * lora_params) + 4 * a * attn_pairs
    return float(model), float(hardware)


def utilisation(flops: float, seconds: float, n_gpus: int = 1,
                peak: float = H100_PEAK_BF16_FLOPS) -> float:
    """Fraction of `n_gpus` * `peak` that `flops` in `seconds` achieves."""
    return flops / (seconds * n_gpus * peak)
