"""The reward model's math as small pure functions: a sequence's reward and the Bradley-Terry loss.

A reward is the sequence-classification head's one logit at the sequence's last token, as
`AutoModelForSequenceClassification` reads it on a right-padded batch, and so as the `reward_model`
scorer reads the saved model. The loss is TRL 1.16's `RewardTrainer`'s with its optional margin and
centering terms; the tests hold both equal to transformers' and TRL's on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.training.dpo import UnsupportedModelError, causal_lm


def is_reward_model(model: nn.Module) -> bool:
    """A one-logit sequence-classification model (peft-wrapped or not)."""
    lm = causal_lm(model)
    return type(lm).__name__.endswith("ForSequenceClassification") and lm.config.num_labels == 1


def reward_head(model: nn.Module) -> nn.Module:
    """The classification head (`score`, as transformers names it for decoder models)."""
    lm = causal_lm(model)
    head = getattr(lm, "score", None)
    if head is None or lm.base_model is lm:
        raise UnsupportedModelError(
            f"{type(lm).__name__}: no `score` head over a decoder body; this trainer cannot train it "
            "as a reward model"
        )
    return head


def sequence_rewards(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, unpad: bool = False
) -> Tensor:
    """The reward of each right-padded row: the head at its last token, fp32. With `unpad`, each
    row runs alone at its own length (no compute on padding; faster on CPUs)."""
    lm = causal_lm(model)
    head, body = reward_head(lm), lm.base_model
    lengths = attention_mask.sum(dim=1)
    if unpad:
        last = torch.stack(
            [
                body(input_ids=input_ids[row : row + 1, :length], use_cache=False).last_hidden_state[0, -1]
                for row, length in enumerate(lengths.tolist())
            ]
        )
    else:
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    return head(last).squeeze(-1).float()


def bradley_terry_loss(
    chosen: Tensor,
    rejected: Tensor,
    *,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Per-pair losses whose mean over a batch is TRL's RewardTrainer loss: -log σ(r_c - r_r - margin),
    plus center_rewards_coefficient × (r_c + r_r)² (TRL adds the coefficient × the batch mean)."""
    gap = chosen - rejected
    if margin is not None:
        gap = gap - margin
    losses = -F.logsigmoid(gap)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses
