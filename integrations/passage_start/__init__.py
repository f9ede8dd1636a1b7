"""`type: integrations.passage_start`: Axolotl's `completion` type, each passage started the way
it is scored and prompted.

Axolotl's `completion` type tokenises a passage the way the tokenizer does and appends EOS.
Mistral's tokenizer adds BOS, so a passage starts with BOS in training, scoring and
generation alike. SmolLM2's adds nothing: with sample packing each passage is attended to on
its own, so the model never learns how a passage begins, while eval/perplexity.py scores and
eval/generate.py prompts every text after an EOS (core.tokens). This type puts that same token
before each passage, so training sees what evaluation scores. With a BOS-adding tokenizer it is
exactly `completion`.

In a recipe:

    datasets:
      - path: ./data/prepared/clean/train.jsonl
        ds_type: json
        type: integrations.passage_start
"""

from __future__ import annotations

from axolotl.prompt_strategies.completion import (
    CompletionPrompter,
    CompletionPromptTokenizingStrategy,
)

from core.tokens import context_prefix_id


class PassageStartStrategy(CompletionPromptTokenizingStrategy):
    """`completion`, with core.tokens' context prefix before each passage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_id = context_prefix_id(self.tokenizer)

    def _tokenize(self, prompt, add_eos_token=True, strip_bos_token=False):
        result = super()._tokenize(prompt, add_eos_token, strip_bos_token)
        if self.prefix_id is None or not result["input_ids"]:
            return result
        # The prefix is context: it is never a target, as position 0 has no token before it.
        for key in ("input_ids", "labels"):
            result[key] = [self.prefix_id, *result[key]]
        result["attention_mask"] = [1, *result["attention_mask"]]
        return result


def load(tokenizer, cfg, ds_cfg=None):
    """Axolotl's entry point for `type: integrations.passage_start` (as completion.load)."""
    strategy = PassageStartStrategy(CompletionPrompter(), tokenizer, cfg.train_on_inputs,
                                    cfg.sequence_len, max_length=cfg.sequence_len * 64)
    if ds_cfg and "field" in ds_cfg:
        strategy.field = ds_cfg["field"]
    return strategy
