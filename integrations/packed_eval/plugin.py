"""Axolotl plugin: held-out evaluation packed into full rows, scoring exactly what unpacked rows do.

    plugins:
      - integrations.packed_eval.PackedEvalPlugin
    eval_sample_packing: true

With `pad_to_sequence_len` every unpacked held-out passage (<= 512 tokens) is padded to the
whole `sequence_len` (4,096): ten times the real tokens, and each evaluation then costs more than
the training steps between two of them. Packed, the passages share rows. Three things make the
packed evaluation score the same tokens with the same result as the unpacked one:

- **passage starts**: in a packed row the last token of one passage would be asked to predict
  the first token of the next (its BOS). An unpacked row never scores its first token. The
  eval collator masks the label at every passage start (`position_ids == 0`);
- **the loss per token**: the Trainer's `eval_loss` is the mean of per-batch means, so a packed
  row of eight passages would weigh like one unpacked passage. Here `eval_loss` is the summed
  token loss over the whole held-out set divided by the number of scored tokens (the mean per
  token, so exp(eval_loss) is the held-out perplexity as `eval.perplexity` defines it), packed
  or not;
- **every passage scored**: before training, the eval batches are counted against the eval
  dataset; a sampler that leaves passages out (Axolotl's packed eval with a micro-batch above 1
  drops bins) stops the run with one line instead of reporting a loss over part of the set.
"""

from __future__ import annotations

import logging

import torch

from core.errors import UserError, reported

try:  # the plugin base class only exists where axolotl is installed
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover
    BasePlugin = object

LOG = logging.getLogger(__name__)
NAME = "integrations.packed_eval.PackedEvalPlugin"
IGNORE = -100


def mask_passage_starts(batch: dict) -> dict:
    """Labels at packed passage starts set to IGNORE (the first token of a row is never a
    target anyway, so unpacked rows are unchanged)."""
    position_ids = batch.get("position_ids")
    labels = batch.get("labels")
    if position_ids is None or labels is None:
        return batch
    starts = position_ids.reshape(labels.shape) == 0
    batch["labels"] = labels.masked_fill(starts, IGNORE)
    return batch


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens a causal LM's loss scores in a batch: labels after the first position."""
    return (labels[..., 1:] != IGNORE).sum()


def expected_scored_tokens(eval_dataset) -> int:
    """Scored tokens of the eval set taken one passage a row (what unpacked evaluation scores)."""
    return sum(sum(1 for label in row[1:] if label != IGNORE) for row in eval_dataset["labels"])


def all_ranks_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


class TokenWeightedEval:
    """Wraps a Trainer's eval collator, prediction step and evaluation loop (see the module
    docstring); `last` holds the figures of the latest evaluation."""

    def __init__(self, trainer, expected: int | None):
        self.trainer = trainer
        self.expected = expected
        self.loss_sum = 0.0
        self.tokens = 0
        self.last: dict = {}
        collator = trainer.eval_data_collator
        trainer.eval_data_collator = lambda features: mask_passage_starts(collator(features))
        self._prediction_step = trainer.prediction_step
        self._evaluation_loop = trainer.evaluation_loop
        trainer.prediction_step = self.prediction_step
        trainer.evaluation_loop = self.evaluation_loop

    def prediction_step(self, model, inputs, *args, **kwargs):
        loss, logits, labels = self._prediction_step(model, inputs, *args, **kwargs)
        if loss is not None and "labels" in inputs:
            count = scored_tokens(inputs["labels"])
            self.loss_sum = self.loss_sum + loss.detach().double() * count
            self.tokens = self.tokens + count
        return loss, logits, labels

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self.loss_sum, self.tokens = 0.0, 0
        output = self._evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if not torch.is_tensor(self.tokens):
            return output
        device = self.tokens.device
        totals = all_ranks_sum(torch.stack([torch.as_tensor(self.loss_sum, device=device,
                                                             dtype=torch.float64),
                                            self.tokens.to(device, torch.float64)]))
        loss_sum, tokens = float(totals[0]), int(totals[1])
        if self.expected is not None and tokens != self.expected:
            LOG.warning("%s: this evaluation scored %d tokens, the eval set has %d",
                        NAME, tokens, self.expected)
        output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / max(tokens, 1)
        self.last = {"loss": loss_sum / max(tokens, 1), "scored_tokens": tokens}
        return output


def count_eval_batches(trainer) -> int:
    """Scored tokens of one pass over the eval dataloader as the Trainer builds it (collation
    only, no model call)."""
    total = torch.zeros((), dtype=torch.long)
    for batch in trainer.get_eval_dataloader():
        total += scored_tokens(batch["labels"]).cpu()
    return int(all_ranks_sum(total))


class PackedEvalPlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self.scorer: TokenWeightedEval | None = None

    def post_trainer_create(self, cfg, trainer):
        if trainer.eval_dataset is None or cfg.get("merge_lora") or cfg.get("inference"):
            return
        expected = expected_scored_tokens(trainer.eval_dataset)
        self.scorer = TokenWeightedEval(trainer, expected)
        found = count_eval_batches(trainer)
        if found != expected:
            with reported():
                raise UserError(
                    f"{NAME}: the evaluation batches score {found:,} of the eval set's "
                    f"{expected:,} tokens (eval_sample_packing with micro_batch_size "
                    f"{cfg.get('micro_batch_size')} leaves passages out): set "
                    "`micro_batch_size: 1` or `eval_sample_packing: false`")
        LOG.info("%s: every evaluation scores the %d held-out tokens, loss per token",
                 NAME, expected)
