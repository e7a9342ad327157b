"""The DPO math as small pure functions: sequence log-probs, the loss variants, the logged metrics.

The loss variants and metric names are those of TRL 1.16's `DPOTrainer`; tests hold the log-probs
and losses equal to TRL's on the same model and batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Tokens per slice of the LM head: bounds the (tokens × vocab) fp32 logits held at once
# (512 × 49152 × 4 B ≈ 100 MB for SmolLM2).
_HEAD_CHUNK = 512


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per token, one slice of tokens at a time.

    Only the log-partition per token is kept for backward, which recomputes each slice's logits:
    the full (tokens × vocab) logits and their softmax never exist at once.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype) -> Tensor:
        log_z = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logps = torch.empty_like(log_z)
        w = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], _HEAD_CHUNK):
            end = start + _HEAD_CHUNK
            logits = (hidden[start:end].to(compute_dtype) @ w.t()).float()
            log_z[start:end] = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - log_z[start:end]
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.compute_dtype = compute_dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, targets, log_z = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        w = weight.to(ctx.compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        )
        grad_logps = grad_logps.float()
        for start in range(0, hidden.shape[0], _HEAD_CHUNK):
            end = start + _HEAD_CHUNK
            h = hidden[start:end].to(ctx.compute_dtype)
            g = grad_logps[start:end, None]
            # d logp_target / d logits = onehot(target) - softmax(logits)
            grad_logits = torch.exp((h @ w.t()).float() - log_z[start:end, None]).mul_(-g)
            grad_logits.scatter_add_(1, targets[start:end, None], g)
            grad_logits = grad_logits.to(ctx.compute_dtype)
            if want_hidden:
                grad_hidden[start:end] = grad_logits @ w
            if want_weight:
                grad_weight.addmm_(grad_logits.t().float(), h.float())
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def _causal_lm(model: nn.Module) -> nn.Module:
    # A peft model wraps the transformers model; its LoRA layers live inside the unwrapped one.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _token_logps(lm: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    head = lm.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None:
        dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        return _ChunkedTokenLogProbs.apply(hidden, head.weight, targets, dtype)
    # An adapted or biased head: plain logits, still only at the response positions.
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, *, unpad: bool = False
) -> Tensor:
    """Sum of log p(token | previous tokens) over the tokens where `loss_mask` is 1, per row.

    Runs the transformer body, then the LM head only at the positions that predict a response
    token (labels shifted by one). Rows must be right-padded. With `unpad`, each row runs alone at
    its own length: no compute on padding, which is faster on CPUs where batching gains little.
    """
    lm = _causal_lm(model)
    body = lm.base_model
    lengths = attention_mask.sum(dim=1).tolist()
    targets_mask = loss_mask[:, 1:].bool()
    if unpad:
        hiddens = []
        for row, length in enumerate(lengths):
            out = body(input_ids=input_ids[row : row + 1, :length], use_cache=False).last_hidden_state[0]
            hiddens.append(out[:-1][targets_mask[row, : length - 1]])
        hidden = torch.cat(hiddens)
    else:
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = out[:, :-1][targets_mask]
    targets = input_ids[:, 1:][targets_mask]
    per_token = _token_logps(lm, hidden, targets)
    # Rows of the flat per-token vector, in row-major order of the mask.
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(
        targets_mask.sum(dim=1)
    )
    return torch.zeros(input_ids.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, per_token
    )


def supports_shared_prompt(model: nn.Module) -> bool:
    """Whether the attention takes the custom 4D masks of `collate_shared_prompt` (sdpa, eager)."""
    return _causal_lm(model).config._attn_implementation in ("sdpa", "eager")


def pair_logps(model: nn.Module, packed: dict[str, Tensor], *, unpad: bool = False) -> Tensor:
    """Chosen then rejected log-probs of pairs packed by `collate_shared_prompt`: a tensor [2 × pairs].

    Same values as `sequence_logps` on the two sequences of each pair, with each prompt run once.
    With `unpad`, each row runs alone at its own length (see `sequence_logps`).
    """
    lm = _causal_lm(model)
    body = lm.base_model
    mask = packed["attention_mask"]
    if lm.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=lm.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(lm.dtype).min
        )
    input_ids, position_ids = packed["input_ids"], packed["position_ids"]
    if unpad:
        lengths = packed["lengths"].tolist()
        hidden = torch.cat(
            [
                body(
                    input_ids=input_ids[row : row + 1, :length],
                    position_ids=position_ids[row : row + 1, :length],
                    attention_mask=mask[row : row + 1, :, :length, :length],
                    use_cache=False,
                ).last_hidden_state[0]
                for row, length in enumerate(lengths)
            ]
        )
        starts = torch.cumsum(packed["lengths"], 0) - packed["lengths"]
        flat = starts.to(input_ids.device)[packed["source_row"]] + packed["source_pos"]
    else:
        out = body(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state.flatten(0, 1)
        flat = packed["source_row"] * input_ids.shape[1] + packed["source_pos"]
    per_token = _token_logps(lm, hidden[flat], packed["targets"])
    logps = torch.zeros(packed["response_lengths"].shape[0], dtype=per_token.dtype, device=per_token.device)
    return logps.index_add(0, packed["segment"], per_token)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and implicit rewards β·(log π − log π_ref) of chosen and rejected.

    ipo follows TRL: the log-ratios are divided by the response lengths (tokens) before the squared
    loss, so pass chosen_lengths and rejected_lengths. sigmoid with label_smoothing > 0 is cDPO
    (TRL 1.16 ignores label_smoothing for sigmoid; at 0 the two agree).
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo normalises by response length: pass chosen_lengths and rejected_lengths")
        ipo_delta = chosen_logratios / chosen_lengths.clamp(
            min=1
        ) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def batch_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> dict[str, float]:
    """TRL's per-step metrics, averaged over the pairs given."""
    return {
        "loss": losses.detach().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
