"""Does the GGUF behave like the merged model? llama.cpp (via llama-cpp-python) vs transformers.

Three checks on the same token ids, so a difference is the runtime and the weights' precision,
never the tokenizer:
  tokenizer   llama.cpp's own tokenisation of the prompt and of the passage equals the Hugging
              Face tokenizer's (what Ollama / LM Studio feed the model is what it was trained on)
  greedy      the first N greedy tokens after the prompt are identical, up to a near-tie: where
              the two first differ, both runtimes' logits for the two tokens are within
              NEAR_TIE_LOGITS of each other (rounding decides a tie; what follows is then a
              different text, so it is not compared)
  perplexity  corpus perplexity of a passage (every token after the first, scored with the full
              context before it) differs by at most a stated tolerance

The reference is the merged model in float32 (bfloat16 where float32 would not fit in memory,
e.g. a 7B model on a small machine). Tolerances (relative perplexity difference to it) per type:
f16 0.5 %, q8_0 2 %, q5_k_m 5 %, q4_k_m 10 % (a sanity bound: 4-bit costs a few per cent),
doubled against a bfloat16 reference. Greedy tokens must match (up to a near-tie) for f16 against
a float32 reference; otherwise the count of matching leading tokens is reported, not asserted.
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
# Two candidate tokens closer than this (in logits, on both runtimes) are a tie that f16 rounding
# may decide either way: a 6-step demo adapter's first token had margins of 0.0004 (transformers)
# and 0.0022 (llama.cpp), while its logits agreed to ~0.01 overall.
NEAR_TIE_LOGITS = 0.05


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


def hf_greedy(model, ids: list[int], n: int):
    """(the first n greedy tokens, the raw logits each was chosen from: n x vocab)."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                       device=model.device),
                             max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, num_beams=1, pad_token_id=model.config.eos_token_id,
                             output_logits=True, return_dict_in_generate=True)
    logits = torch.cat([step.float() for step in out.logits]).cpu().numpy()
    return out.sequences[0, len(ids):].tolist(), logits


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


def llama_greedy(llm, ids: list[int], n: int):
    """(the first n greedy tokens, the logits each was chosen from: n x vocab)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    logits = []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        token = int(np.argmax(row))
        out.append(token)
        logits.append(row)
        llm.eval([token])
    return out, np.stack(logits)


def leading_matches(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_divergence(reference: list[int], reference_logits, tokens: list[int],
                      logits) -> dict | None:
    """Where two greedy runs first differ (None if they never do): the step and, on each side,
    how far ahead its own choice was of the other's. Before that step the contexts are the same,
    so the logits compare like for like."""
    step = leading_matches(tokens, reference)
    if step >= min(len(tokens), len(reference)):
        return None
    ours, theirs = tokens[step], reference[step]
    ref_margin = float(reference_logits[step][theirs] - reference_logits[step][ours])
    llama_margin = float(logits[step][ours] - logits[step][theirs])
    return {"step": step, "reference_margin": round(ref_margin, 4),
            "llama_cpp_margin": round(llama_margin, 4),
            "near_tie": max(ref_margin, llama_margin) <= NEAR_TIE_LOGITS}


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
        self.greedy, self.greedy_logits = hf_greedy(model, self.prompt_ids, greedy_tokens)
        self.ppl = corpus_ppl(hf_nll(model, self.passage_ids))
        del model

    def compare(self, gguf: Path, gguf_type: str) -> dict:
        n_ctx = max(len(self.passage_ids), len(self.prompt_ids) + self.greedy_tokens) + 8
        llm = load_llama(gguf, n_ctx=max(256, n_ctx))
        try:
            llama_prompt = llama_token_ids(llm, self.prompt, self.prefix)
            llama_passage = llama_token_ids(llm, self.passage, self.prefix)
            greedy, greedy_logits = llama_greedy(llm, self.prompt_ids, self.greedy_tokens)
            ppl = corpus_ppl(llama_nll(llm, self.passage_ids))
            text = llm.detokenize(greedy).decode("utf-8", errors="replace")
        finally:
            llm.close()
        diff_pct = 100 * (ppl - self.ppl) / self.ppl
        tolerance = PPL_TOLERANCE_PCT.get(gguf_type)
        if tolerance is not None and self.dtype != "float32":
            tolerance *= 2  # a bfloat16 reference is itself ~0.5 % off
        matches = leading_matches(greedy, self.greedy)
        divergence = greedy_divergence(self.greedy, self.greedy_logits, greedy, greedy_logits)
        result = {
            "gguf": gguf.name,
            "type": gguf_type,
            "tokenizer_matches": llama_prompt == self.prompt_ids
            and llama_passage == self.passage_ids,
            "greedy_tokens": self.greedy_tokens,
            "greedy_leading_matches": matches,
            "greedy_divergence": divergence,
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
            ok = ok and (divergence is None or divergence["near_tie"])
        result["passed"] = bool(ok)
        return result
