"""Does the GGUF behave like the merged model? llama.cpp (via llama-cpp-python) vs transformers.

Three checks on the same token ids, so a difference is the runtime and the weights' precision,
never the tokenizer:
  tokenizer   llama.cpp's own tokenisation of the prompt and of the passage equals the Hugging
              Face tokenizer's (what Ollama / LM Studio feed the model is what it was trained on)
  greedy      the first N greedy tokens after the prompt are identical
  perplexity  corpus perplexity of a passage (every token after the first, scored with the full
              context before it) differs by at most a stated tolerance

The reference is the merged model in float32 (bfloat16 where float32 would not fit in memory,
e.g. a 7B model on a small machine). Tolerances (relative perplexity difference to it) per type:
f16 0.5 %, q8_0 2 %, q5_k_m 5 %, q4_k_m 10 % (a sanity bound: 4-bit costs a few per cent),
doubled against a bfloat16 reference. Greedy tokens must match exactly for f16 against a float32
reference; otherwise the count of matching leading tokens is reported, not asserted (rounding
can flip a near-tie).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from core.tokens import context_prefix_id

PPL_TOLERANCE_PCT = {"f16": 0.5, "bf16": 0.5, "f32": 0.1, "q8_0": 2.0, "q5_k_m": 5.0,
                     "q4_k_m": 10.0}
GREEDY_MUST_MATCH = {"f16", "bf16", "f32"}
DEFAULT_PROMPT = "I'm afraid I've created a"
DEFAULT_GREEDY_TOKENS = 16


def hf_token_ids(tokenizer, text: str, with_prefix: int | None) -> list[int]:
    """Token ids as used for scoring: the tokenizer's own specials plus core.tokens' context
    prefix (EOS before each text when the tokenizer adds no BOS, e.g. SmolLM2) when one is used."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids if with_prefix is None else [with_prefix, *ids]


def llama_token_ids(llm, text: str, with_prefix: int | None) -> list[int]:
    """llama.cpp's tokenisation, with the same context-only prefix token when one is used."""
    add_bos = with_prefix is None
    ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    return ids if add_bos else [with_prefix, *ids]


def nll_from_logits(logits, ids: list[int]) -> list[float]:
    """-log p(ids[t] | ids[:t]) for t >= 1 from a [T, vocab] float array of next-token logits."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)[: len(ids) - 1]
    top = logits.max(axis=1, keepdims=True)
    logsumexp = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
    targets = logits[np.arange(len(ids) - 1), ids[1:]]
    return (logsumexp - targets).tolist()


def hf_nll(model, ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    logits = logits.float().cpu().numpy()
    return nll_from_logits(logits, ids)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                       device=model.device),
                             max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, num_beams=1, pad_token_id=model.config.eos_token_id)
    return out[0, len(ids):].tolist()


def load_llama(gguf: Path, n_ctx: int):
    import llama_cpp

    gpu = llama_cpp.llama_supports_gpu_offload()  # a CUDA/Metal build: all layers on the GPU
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                           logits_all=True, n_gpu_layers=-1 if gpu else 0,
                           n_threads=os.cpu_count() or 2, seed=0, verbose=False)


def llama_nll(llm, ids: list[int]) -> list[float]:
    llm.reset()
    llm.eval(ids)
    return nll_from_logits(llm.scores[: len(ids)], ids)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def leading_matches(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def corpus_ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def reference_placement(merged_dir: Path) -> tuple[str, str]:
    """(device, dtype) for the transformers reference: float32 where it fits comfortably (the
    demo model everywhere), else the GPU in bfloat16, else the CPU in bfloat16 (a 7B model:
    28 GB in float32)."""
    import torch

    weights = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))
    params = weights / 2 if '"bfloat16"' in (merged_dir / "config.json").read_text() or \
        '"float16"' in (merged_dir / "config.json").read_text() else weights / 4
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
        return ("cuda", "float32") if params * 4 < 0.6 * free else ("cuda", "bfloat16")
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ("cpu", "float32") if params * 4 < 0.5 * available else ("cpu", "bfloat16")


class Reference:
    """The merged model in transformers, scored once and compared with every GGUF."""

    def __init__(self, merged_dir: Path, prompt: str, passage: str, greedy_tokens: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, self.dtype = reference_placement(merged_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        model = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=getattr(torch, self.dtype), device_map=self.device).eval()
        self.prompt, self.passage, self.greedy_tokens = prompt, passage, greedy_tokens
        self.prefix = context_prefix_id(self.tokenizer)
        self.prompt_ids = hf_token_ids(self.tokenizer, prompt, self.prefix)
        self.passage_ids = hf_token_ids(self.tokenizer, passage, self.prefix)
        self.greedy = hf_greedy(model, self.prompt_ids, greedy_tokens)
        self.ppl = corpus_ppl(hf_nll(model, self.passage_ids))
        del model

    def compare(self, gguf: Path, gguf_type: str) -> dict:
        n_ctx = max(len(self.passage_ids), len(self.prompt_ids) + self.greedy_tokens) + 8
        llm = load_llama(gguf, n_ctx=max(256, n_ctx))
        try:
            llama_prompt = llama_token_ids(llm, self.prompt, self.prefix)
            llama_passage = llama_token_ids(llm, self.passage, self.prefix)
            greedy = llama_greedy(llm, self.prompt_ids, self.greedy_tokens)
            ppl = corpus_ppl(llama_nll(llm, self.passage_ids))
            text = llm.detokenize(greedy).decode("utf-8", errors="replace")
        finally:
            llm.close()
        diff_pct = 100 * (ppl - self.ppl) / self.ppl
        tolerance = PPL_TOLERANCE_PCT.get(gguf_type)
        if tolerance is not None and self.dtype != "float32":
            tolerance *= 2  # a bfloat16 reference is itself ~0.5 % off
        matches = leading_matches(greedy, self.greedy)
        result = {
            "gguf": gguf.name,
            "type": gguf_type,
            "tokenizer_matches": llama_prompt == self.prompt_ids
            and llama_passage == self.passage_ids,
            "greedy_tokens": self.greedy_tokens,
            "greedy_leading_matches": matches,
            "greedy_text_llama_cpp": text,
            "passage_tokens": len(self.passage_ids),
            "reference": f"transformers, {self.dtype} on {self.device}",
            "ppl_transformers": round(self.ppl, 4),
            "ppl_llama_cpp": round(ppl, 4),
            "ppl_diff_pct": round(diff_pct, 3),
            "ppl_tolerance_pct": tolerance,
        }
        ok = result["tokenizer_matches"] and (tolerance is None or abs(diff_pct) <= tolerance)
        if gguf_type in GREEDY_MUST_MATCH and self.dtype == "float32":
            ok = ok and matches == self.greedy_tokens
        result["passed"] = bool(ok)
        return result
