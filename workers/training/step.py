"""A step's forward and backward, and the no-grad scoring, each shared out among the ranks (one rank:
all of it).

A step's pairs are shared out by tokens (`shard_pairs`); each rank adds sum(losses) * world / n to
the gradient, which DDP and FSDP average, so the step's gradient is the mean over its n pairs
whatever the split (2 ranks × 2 pairs == 1 × 4, and 2 micro-batches × 2 pairs == 1 × 4). Ranks with
fewer forward passes in a step run zero-weighted ones, so collectives stay in step. Metrics are
summed over pairs and ranks, then divided by n. Reference and evaluation log-probs are scored in
shares and summed across ranks.

The objective is `dpo_loss` on the four log-prob tensors (policy and reference, chosen and
rejected), or a reward model's `bradley_terry_loss` on the two reward tensors; everything else here
is the same for any of them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cai_dpo.core.training_params import TrainParams
from workers.training.data import TokenizedPair, token_batches
from workers.training.dpo import METRIC_NAMES, batch_metric_sums, batch_metrics, dpo_loss, objective_metrics
from workers.training.model import Setup, collate_for, to_device
from workers.training.ranks import Ranks
from workers.training.reward_model import bradley_terry_loss
from workers.training.schedule import pairs_for_step, shard_pairs


def micro_batches(pairs: list[TokenizedPair], batch_size: int, max_tokens: int | None) -> list[slice]:
    """Consecutive runs of `pairs` per forward pass: by token budget when given, else batch_size pairs."""
    if max_tokens is None:
        return [slice(start, start + batch_size) for start in range(0, len(pairs), batch_size)]
    return [slice(batch[0], batch[-1] + 1) for batch in token_batches(pairs, max_tokens)]


def pair_margins(pairs: list[TokenizedPair], device: torch.device) -> Tensor:
    """The pairs' margins (a reward model's least gaps), as one tensor on the device."""
    return to_device({"margin": torch.tensor([p.margin for p in pairs])}, device)["margin"]


def pair_losses(
    logps: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    lengths: Tensor,
    params: TrainParams,
    chosen_tokens_per_pair: Tensor | float | None = None,
    margins: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The objective on [chosen..., rejected...] log-probs and answer lengths, with the run's settings:
    per-pair losses and the implicit rewards of chosen and rejected. `chosen_tokens_per_pair`: the
    whole step's (the sft term is a per-token mean over the step); None: these pairs'. A reward
    model's rewards stand in for the log-probs; `margins`: its pairs' least gaps (`use_margin`)."""
    chosen, rejected = logps.chunk(2)
    if params.objective == "reward_model":
        losses = bradley_terry_loss(
            chosen,
            rejected,
            margin=margins,
            center_rewards_coefficient=params.center_rewards_coefficient,
        )
        return losses, chosen.detach(), rejected.detach()
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    names, weights = params.loss_terms()
    return dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        params.beta,
        names,
        params.label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        loss_weights=weights,
        chosen_tokens_per_pair=chosen_tokens_per_pair,
        discopop_tau=params.discopop_tau,
        simpo_gamma=params.simpo_gamma,
    )


@torch.no_grad()
def score_with(
    setup: Setup, pairs: list[TokenizedPair], batch_size: int, pad_token_id: int, ranks: Ranks
) -> tuple[Tensor, Tensor]:
    """Chosen and rejected log-probs of every pair without gradients (reference and evaluation).

    Length-sorted forward passes of `runtime.score_tokens` tokens with FlexAttention, else of
    `batch_size` pairs; each rank runs every world_size-th (a repeat where it has none left,
    discarded), then the ranks sum. Returned on the CPU, read back once at the end.
    """
    n, engine, runtime = len(pairs), setup.engine, setup.runtime
    if n == 0:
        return torch.zeros(0), torch.zeros(0)
    was_training = engine.training
    # With FlexAttention the mode stays as it is (train, see load_model): the trainer turns dropout
    # off, so both modes compute the same, and transformers recompiles FlexAttention at each switch.
    if not runtime.flex:
        engine.eval()
    # Length-sorted batches waste less on padding; results go back to their pair's index.
    order = sorted(range(n), key=lambda i: pairs[i].packed_tokens)
    ordered = [pairs[i] for i in order]
    parts = micro_batches(ordered, batch_size, runtime.score_tokens if runtime.flex else None)
    mine = parts[ranks.rank :: ranks.world_size]
    passes = -(-len(parts) // ranks.world_size)
    results = [engine(ordered[part], pad_token_id, runtime)[0].view(2, -1) for part in mine]
    for _ in range(passes - len(mine)):  # FSDP gathers in every forward: all ranks run as many
        engine(ordered[parts[0]], pad_token_id, runtime)
    engine.train(was_training)
    scored = torch.zeros(2, n, device=runtime.device)
    if results:
        positions = torch.tensor([order[i] for part in mine for i in range(n)[part]])
        scored[:, to_device({"positions": positions}, runtime.device)["positions"]] = torch.cat(results, 1)
    ranks.all_reduce_sum(scored)
    scored = scored.cpu()
    return scored[0], scored[1]


def score_pairs(
    model: nn.Module,
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    ld_alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """`score_with` for a model handed in from outside a run (evaluation, tests), in this process;
    `ld_alpha`: LD-DPO's log-probs."""
    setup = Setup.alone(model, device, ld_alpha=ld_alpha)
    return score_with(setup, pairs, batch_size, pad_token_id, Ranks.single(device))


def forward_backward(
    setup: Setup,
    step_pairs: list[TokenizedPair],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    params: TrainParams,
    pad_token_id: int,
    ranks: Ranks,
) -> Tensor:
    """Forward and backward over one optimizer step's pairs (every rank passes all of them, with
    their reference log-probs), this rank's share in micro-batches of `params.batch_size` pairs (or
    of `params.max_tokens_per_batch` tokens). Returns the step's metrics (METRIC_NAMES, means over
    its pairs) on the device, summed across ranks."""
    runtime, world = setup.runtime, ranks.world_size
    shares = shard_pairs(
        [p.packed_tokens for p in step_pairs], world, by_tokens=runtime.max_tokens is not None
    )
    passes = max(
        len(micro_batches([step_pairs[j] for j in share], params.batch_size, runtime.max_tokens))
        for share in shares
    )
    pairs = [step_pairs[j] for j in shares[ranks.rank]]
    mine = to_device({"mine": torch.tensor(shares[ranks.rank], dtype=torch.long)}, runtime.device)["mine"]
    ref_chosen = ref_chosen.to(runtime.device, non_blocking=True)[mine]
    ref_rejected = ref_rejected.to(runtime.device, non_blocking=True)[mine]
    micro = micro_batches(pairs, params.batch_size, runtime.max_tokens)
    chosen_per_pair = sum(len(p.chosen_ids) for p in step_pairs) / len(step_pairs)  # the step's, all ranks
    sums = torch.zeros(len(METRIC_NAMES), device=runtime.device)
    for index in range(passes):
        with setup.accumulating(last=index == passes - 1):
            if index >= len(micro):  # this rank's pairs ran out: a pass with no weight
                logps, _ = setup.engine(step_pairs[:1], pad_token_id, runtime)
                (logps.sum() * 0.0).backward()
                continue
            part = micro[index]
            logps, lengths = setup.engine(pairs[part], pad_token_id, runtime)
            losses, chosen_rewards, rejected_rewards = pair_losses(
                logps, ref_chosen[part], ref_rejected[part], lengths, params, chosen_per_pair,
                margins=pair_margins(pairs[part], logps.device) if params.use_margin else None,
            )  # fmt: skip
            # x * world / n: alone, exactly x / n.
            (losses.sum() * world / len(step_pairs)).backward()
        sums += batch_metric_sums(losses, chosen_rewards, rejected_rewards, *logps.detach().chunk(2))
    return ranks.all_reduce_sum(sums) / len(step_pairs)


WIDTH_STEPS = 256  # steps whose micro-batches are read ahead for their shapes (an epoch of most runs)


def warm_compiled_shapes(
    setup: Setup, train: list[TokenizedPair], params: TrainParams, pad_token_id: int, steps: range
) -> int:
    """Forward and backward once at each input shape the given steps' micro-batches will have
    (`collate_for`'s, read on the host from the step order, which is known before step 0), with a
    zero loss, so torch.compile makes its graphs for them here and not inside timed steps. The
    gradients it leaves are zeros: the caller zeroes them. Returns the number of shapes.

    One process only: under torchrun each rank's shares have their own shapes, and a rank with
    fewer would leave the others waiting in a collective."""
    runtime, seen = setup.runtime, set()
    for step in steps[:WIDTH_STEPS]:
        pairs = [train[i] for i in pairs_for_step(step, len(train), params.pairs_per_step, params.seed)]
        for part in micro_batches(pairs, params.batch_size, runtime.max_tokens):
            kind, batch = collate_for(pairs[part], pad_token_id, runtime)
            shape = (kind, *(tuple(value.shape) for value in batch.values()))
            if shape in seen:
                continue
            seen.add(shape)
            logps, _ = setup.engine(pairs[part], pad_token_id, runtime)
            (logps.sum() * 0.0).backward()
    return len(seen)


def accumulate_step(
    model: nn.Module,
    pairs: list[TokenizedPair],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    params: TrainParams,
    pad_token_id: int,
    device: torch.device,
) -> dict[str, float]:
    """`forward_backward` for a model handed in from outside a run, in this process: its metrics."""
    setup = Setup.alone(model, device, max_tokens=params.max_tokens_per_batch, ld_alpha=params.ld_alpha)
    ranks = Ranks.single(device)
    metrics = forward_backward(setup, pairs, ref_chosen, ref_rejected, params, pad_token_id, ranks)
    return dict(zip(METRIC_NAMES, metrics.tolist(), strict=True))


def eval_metrics(
    pairs: list[TokenizedPair], policy: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor], params: TrainParams
) -> dict[str, float]:
    """TRL's metrics of the held-out pairs from their policy and reference log-probs (objective sft:
    `loss` is the held-out NLL per answer token, TRL SFTTrainer's eval_loss)."""
    logps = torch.cat(policy)
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    margins = pair_margins(pairs, logps.device) if params.use_margin else None
    losses, chosen_rewards, rejected_rewards = pair_losses(logps, *ref, lengths, params, margins=margins)
    return objective_metrics(
        params.objective, batch_metrics(losses, chosen_rewards, rejected_rewards, *policy)
    )
