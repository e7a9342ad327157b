"""Reward accuracy of a trained model on a preference set (e.g. imported HH-RLHF test pairs).

For the base model: how often it gives the chosen answer a higher log-probability than the
rejected one. For the trained model: the same, and how often its DPO implicit reward
`beta * (log pi - log pi_ref)` ranks chosen above rejected (the reference is the base model), with
the mean margins. Log-probs are the trainer's own (`tokenize_pairs`, `score_pairs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cai_dpo.core.evaluation import reward_accuracy
from workers.training.data import PairExample, tokenize_pairs
from workers.training.step import score_pairs


def _pair_logps(model_path: Path, pairs: list, device: torch.device) -> tuple[list[float], list[float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").to(
        device
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen, rejected = score_pairs(model, pairs, 8, pad, device)
    del model
    return chosen.tolist(), rejected.tolist()


def external_reward_accuracy(
    *, trained: Path, base: Path, beta: float, examples: list[PairExample], max_length: int
) -> dict[str, Any]:
    """Accuracy and mean margin of base and trained model on `examples` (pairs too long for
    `max_length` are left out and counted)."""
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(trained)
    pairs, dropped = tokenize_pairs(tokenizer, examples, max_length)
    base_chosen, base_rejected = _pair_logps(base, pairs, device)
    policy_chosen, policy_rejected = _pair_logps(trained, pairs, device)
    implicit_chosen = [beta * (p - r) for p, r in zip(policy_chosen, base_chosen, strict=True)]
    implicit_rejected = [beta * (p - r) for p, r in zip(policy_rejected, base_rejected, strict=True)]
    return {
        "n_pairs": len(pairs),
        "dropped_by_truncation": len(dropped),
        "base": {"logp": reward_accuracy(base_chosen, base_rejected)},
        "trained": {
            "logp": reward_accuracy(policy_chosen, policy_rejected),
            "implicit_reward": reward_accuracy(implicit_chosen, implicit_rejected),
        },
    }
