"""How a passage starts: the one token every part of the project puts before a text.

Mistral's tokenizer adds BOS itself: nothing extra. Tokenizers that add none (SmolLM2's) get EOS
before each text, the token that separated documents in the model's pretraining (and the
context-only first token lm-eval uses for rolling log-likelihoods). Scoring (eval/perplexity.py),
generation (eval/generate.py), the GGUF check (export/check.py) and training with the
`integrations.passage_start` dataset type all use this one rule; without a prefix a text's first
token would have no context and could not be scored.
"""

from __future__ import annotations


def context_prefix_id(tokenizer) -> int | None:
    """The token to put before each text, or None when the tokenizer adds BOS itself."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        return None
    return tokenizer.eos_token_id

