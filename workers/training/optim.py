"""The optimizer behind one small interface: set the learning rate, clip and step, zero the gradients.

Two implementations. `AdamW`: fused AdamW on the model's own float32 weights, plain tensors or
FSDP2's DTensor shards (the norm is then the norm over every shard). `MasterAdamW`: a bf16 model
with float32 master copies in the optimizer, the update rounded into the model's weights. The loop
and the checkpoints ask only what `Optimizer` declares; `make_optimizer` picks by the weights' dtype.
Both decay the matrices only (`param_groups`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def decays(param: nn.Parameter) -> bool:
    """Weight decay for matrices only: biases, norm weights and every other 1-D (or scalar) parameter
    take none, as in transformers' Trainer (its decay groups leave out biases and norm layers)."""
    return param.ndim >= 2


def param_groups(
    tensors: list[Tensor], params: list[nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW's groups over `tensors` (the parameters themselves, or their float32 masters), decided by
    the matching `params`: `weight_decay` for the matrices, 0 for the rest; empty groups left out."""
    decay = [t for t, p in zip(tensors, params, strict=True) if decays(p)]
    no_decay = [t for t, p in zip(tensors, params, strict=True) if not decays(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def regrouped(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> dict[str, Any]:
    """A checkpoint written before the decay groups (one group over `params`, in order) in the groups
    of `optimizer` (`param_groups`: the matrices, then the rest), so a run resumes across the change;
    any other state as it is."""
    saved = state["param_groups"]
    if len(saved) != 1 or len(optimizer.param_groups) == 1 or len(saved[0]["params"]) != len(params):
        return state
    old_ids = saved[0]["params"]
    order = [i for i, p in enumerate(params) if decays(p)] + [
        i for i, p in enumerate(params) if not decays(p)
    ]
    groups, start = [], 0
    for group in optimizer.param_groups:
        size = len(group["params"])
        ids = list(range(start, start + size))
        groups.append(saved[0] | {"weight_decay": group["weight_decay"], "params": ids})
        start += size
    moments = {new: state["state"][old_ids[i]] for new, i in enumerate(order) if old_ids[i] in state["state"]}
    return {"state": moments, "param_groups": groups}


class Optimizer:
    """What the training loop and the checkpoints need of an optimizer."""

    optimizer: torch.optim.Optimizer  # the torch optimizer whose state a checkpoint holds
    params: list[nn.Parameter]  # the trainable parameters, in the model's order

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clip_and_step(self, max_norm: float | None) -> Tensor:
        """Clip the global gradient norm to `max_norm` (None: no clipping), step; return the norm."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(regrouped(state, self.optimizer, self.params))

    def masters(self) -> dict[int, Tensor]:
        """float32 values the optimizer keeps apart from the model's (rounded) weights, by id(param);
        empty when the model's own weights are the float32 ones."""
        return {}

    def load_masters(self, values: dict[int, Tensor]) -> None:
        """Set the masters (and the model's rounded weights) from float32 values keyed by id(param)."""

    def free(self) -> None:
        """Drop the moments: training is over, and saving the model wants the memory."""
        self.optimizer.state.clear()


class AdamW(Optimizer):
    """Fused AdamW on float32 weights: plain tensors, or FSDP2's DTensor shards."""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float):
        self.params = list(params)
        groups = param_groups(self.params, self.params, weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def clip_and_step(self, max_norm: float | None) -> Tensor:
        # As torch.nn.utils.clip_grad_norm_, with the norm of DTensor shards made whole first (as
        # torchtitan's clip_grad_norm_ does for FSDP2).
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm)
        self.optimizer.step()
        return norm


class MasterAdamW(Optimizer):
    """AdamW on float32 master copies of low-precision (bf16) parameters.

    The model computes in bf16 and its gradients arrive in bf16; clipping and the AdamW update run in
    fp32 on the masters, which are then rounded into the model's weights. Parameters step in groups of
    about `group_elements`, so fp32 copies of the gradients exist for one group at a time. Nothing here
    reads a value back to the host.
    """

    def __init__(
        self, params: list[nn.Parameter], lr: float, weight_decay: float, group_elements: int = 2**26
    ):
        self.params = list(params)
        self.master_weights = [p.detach().to(torch.float32, copy=True) for p in self.params]
        groups = param_groups(self.master_weights, self.params, weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
        self.groups: list[list[int]] = [[]]
        size = 0
        for index, param in enumerate(self.params):
            if self.groups[-1] and size + param.numel() > group_elements:
                self.groups.append([])
                size = 0
            self.groups[-1].append(index)
            size += param.numel()

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def masters(self) -> dict[int, Tensor]:
        return {id(param): master for param, master in zip(self.params, self.master_weights, strict=True)}

    @torch.no_grad()
    def load_masters(self, values: dict[int, Tensor]) -> None:
        for param, master in zip(self.params, self.master_weights, strict=True):
            if id(param) in values:
                master.copy_(values[id(param)])
                param.copy_(master)

    @torch.no_grad()
    def clip_and_step(self, max_norm: float | None) -> Tensor:
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not with_grad:
            return torch.zeros((), device=self.master_weights[0].device)
        norms = torch._foreach_norm([self.params[i].grad for i in with_grad], 2.0, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        # Clipping multiplies the gradients by coef: fused AdamW divides them by its grad_scale (the
        # AMP unscaling) in the same pass as the update, so no separate pass over the gradients.
        self.optimizer.grad_scale = (total + 1e-6).div(max_norm).clamp(min=1.0) if max_norm else None
        for group in self.groups:
            members = [i for i in group if self.params[i].grad is not None]
            if not members:
                continue
            grads = [self.params[i].grad.float() for i in members]
            for i, grad in zip(members, grads, strict=True):
                self.master_weights[i].grad = grad
            self.optimizer.step()  # steps the masters that have a gradient: this group's
            for i in members:
                self.master_weights[i].grad = None
                self.params[i].copy_(self.master_weights[i])
        return total


def make_optimizer(trainable: list[nn.Parameter], lr: float, weight_decay: float) -> Optimizer:
    """fp32 masters where the trainable weights are low precision; plain AdamW on fp32 ones."""
    if any(p.dtype != torch.float32 for p in trainable):
        return MasterAdamW(trainable, lr, weight_decay)
    return AdamW(trainable, lr, weight_decay)
