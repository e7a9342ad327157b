"""Pure functions of the step: the learning rate, the pairs of each step, and each rank's share.

The data order and learning rate depend only on (seed, step), so a resumed run sees the same
batches, and every rank of a group computes the same ones without asking the others.
"""

from __future__ import annotations

import math
import random

from cai_dpo.core.training_params import TrainParams


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup climbs linearly to `peak` without a wasted zero-lr first step; then linear or cosine
    decay toward zero at `total_steps` (as transformers' schedules after their warmup).
    """
    if step < warmup_steps:
        return peak * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def steps_per_epoch(n_pairs: int, pairs_per_step: int) -> int:
    return math.ceil(n_pairs / pairs_per_step)


def total_steps_for(params: TrainParams, n_pairs: int) -> int:
    return params.max_steps or params.epochs * steps_per_epoch(n_pairs, params.pairs_per_step)


def warmup_steps_for(params: TrainParams, total_steps: int) -> int:
    return math.ceil(params.warmup_ratio * total_steps)


def pairs_for_step(step: int, n_pairs: int, pairs_per_step: int, seed: int) -> list[int]:
    """Indices of the training pairs of optimizer step `step`: a seeded shuffle per epoch, sliced."""
    per_epoch = steps_per_epoch(n_pairs, pairs_per_step)
    epoch, position = divmod(step, per_epoch)
    order = list(range(n_pairs))
    random.Random(f"dpo-order:{seed}:{epoch}").shuffle(order)
    return order[position * pairs_per_step : (position + 1) * pairs_per_step]


def shard_pairs(tokens: list[int], world_size: int, *, by_tokens: bool) -> list[list[int]]:
    """Positions of a step's pairs for each rank: the longest first, each to the rank with the least
    work so far (pairs, or tokens when `by_tokens`); each rank's in step order. One rank takes all
    of them, in step order."""
    shards: list[list[int]] = [[] for _ in range(world_size)]
    pairs, load = [0] * world_size, [0] * world_size
    for j in sorted(range(len(tokens)), key=lambda j: (-tokens[j], j)):
        rank = min(
            range(world_size),
            key=lambda r: (load[r], pairs[r], r) if by_tokens else (pairs[r], load[r], r),
        )
        shards[rank].append(j)
        pairs[rank] += 1
        load[rank] += tokens[j]
    return [sorted(shard) for shard in shards]
