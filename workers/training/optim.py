"""The optimizer behind one small interface: set the learning rate, clip and step, zero the gradients.

Three implementations. `AdamW`: fused AdamW on the model's own float32 weights, plain tensors or
FSDP2's DTensor shards (the norm is then the norm over every shard). `MasterAdamW`: a bf16 model
with float32 master copies in the optimizer, the update rounded into the model's weights.
`FlatMasterAdamW`: the same update with masters, moments and gradients in flat buffers (each
`.grad` a view into one), a few fused kernels a step instead of hundreds of small ones. The loop
and the checkpoints ask only what `Optimizer` declares; `make_optimizer` picks by the weights' dtype
(and `CAI_TRAIN_OPTIMIZER`: `flat`, the default, or `grouped`). All decay the matrices only
(`param_groups`).
"""

from __future__ import annotations

import os
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


class FlatMasterAdamW(Optimizer):
    """`MasterAdamW` on flat buffers: the same update, a handful of kernels a step.

    Per decay group (`param_groups`): one fp32 buffer of masters, two of moments, one of gradients in
    the parameters' dtype; each parameter's `.grad` is a view into the last, so the backward
    accumulates into it in place and `zero_grad` zeroes it (never None); a `.grad` replaced from
    outside is copied back into its view before the step. A step is one norm over the
    gradient buffers and, per group, torch's fused AdamW kernel over the buffers in slices of
    `chunk_elements` (the fp32 copy of the gradients exists one slice at a time), then one multi-tensor
    copy of the masters into the model's weights. Every parameter has a gradient (zero where the backward
    left it untouched), so every one steps: MasterAdamW skips a parameter whose `.grad` is None.
    Its state_dict is torch AdamW's (per parameter, the same indices), so either optimizer resumes
    from the other's checkpoint.
    """

    betas, eps = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as MasterAdamW runs

    def __init__(
        self, params: list[nn.Parameter], lr: float, weight_decay: float, chunk_elements: int = 2**26
    ):
        self.params, self.lr, self.chunk = list(params), lr, chunk_elements
        self.groups: list[_FlatGroup] = []
        for group in param_groups(self.params, self.params, weight_decay):
            self.groups.append(_FlatGroup(group["params"], group["weight_decay"]))
        self.order = [p for group in self.groups for p in group.params]  # torch AdamW's state indices

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def zero_grad(self) -> None:
        for group in self.groups:
            group.grad.zero_()
            group.reattach_grads()

    def masters(self) -> dict[int, Tensor]:
        return {id(p): m for group in self.groups for p, m in zip(group.params, group.masters, strict=True)}

    @torch.no_grad()
    def load_masters(self, values: dict[int, Tensor]) -> None:
        for group in self.groups:
            for param, master in zip(group.params, group.masters, strict=True):
                if id(param) in values:
                    master.copy_(values[id(param)])
            group.round_into_params()

    @torch.no_grad()
    def clip_and_step(self, max_norm: float | None) -> Tensor:
        for group in self.groups:
            group.gather_grads()
        norms = [torch.linalg.vector_norm(group.grad, dtype=torch.float32) for group in self.groups]
        total = torch.linalg.vector_norm(torch.stack(norms))
        # As MasterAdamW: the fused kernel divides the gradients by grad_scale (the clipping).
        scale = (total + 1e-6).div(max_norm).clamp(min=1.0) if max_norm else None
        for group in self.groups:
            group.step.add_(1)
            group.count += 1
            for start in range(0, group.master.numel(), self.chunk):
                piece = slice(start, start + self.chunk)
                torch._fused_adamw_(
                    [group.master[piece]], [group.grad[piece].float()], [group.exp_avg[piece]],
                    [group.exp_avg_sq[piece]], [], [group.step], amsgrad=False, lr=self.lr,
                    beta1=self.betas[0], beta2=self.betas[1], weight_decay=group.weight_decay,
                    eps=self.eps, maximize=False, grad_scale=scale, found_inf=None,
                )  # fmt: skip
            group.round_into_params()
        return total

    def state_dict(self) -> dict[str, Any]:
        """torch AdamW's state_dict of the masters: per parameter, by its index over the groups."""
        state: dict[int, dict[str, Tensor]] = {}
        groups, index = [], 0
        for group in self.groups:
            indices = list(range(index, index + len(group.params)))
            index += len(group.params)
            groups.append(
                {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": group.weight_decay,
                 "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                 "differentiable": False, "fused": True, "decoupled_weight_decay": True, "params": indices}
            )  # fmt: skip
            if group.count == 0:
                continue
            for i, avg, avg_sq in zip(indices, group.exp_avgs, group.exp_avg_sqs, strict=True):
                state[i] = {"step": group.step.clone(), "exp_avg": avg, "exp_avg_sq": avg_sq}
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["param_groups"]
        if len(saved) == 1 and len(self.groups) > 1 and len(saved[0]["params"]) == len(self.params):
            state = self._regrouped(state)  # written before the decay groups: one group, the model's order
            saved = state["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g.params) for g in self.groups]:
            raise ValueError("the optimizer state has other parameter groups than this model")
        for group, saved_group in zip(self.groups, saved, strict=True):
            for i, avg, avg_sq in zip(saved_group["params"], group.exp_avgs, group.exp_avg_sqs, strict=True):
                entry = state["state"].get(i)
                if entry is None:  # never stepped (MasterAdamW: no gradient yet)
                    avg.zero_()
                    avg_sq.zero_()
                    continue
                avg.copy_(entry["exp_avg"])
                avg_sq.copy_(entry["exp_avg_sq"])
                group.step.copy_(entry["step"])
                group.count = int(entry["step"].item())
            self.lr = saved_group["lr"]

    def _regrouped(self, state: dict[str, Any]) -> dict[str, Any]:
        """A one-group state (indices in the model's order) in this optimizer's groups and order."""
        position = {id(p): i for i, p in enumerate(self.params)}
        old_ids, entries = state["param_groups"][0]["params"], state["state"]
        moved = {j: entries.get(old_ids[position[id(p)]]) for j, p in enumerate(self.order)}
        groups, start = [], 0
        for group in self.groups:
            ids = list(range(start, start + len(group.params)))
            groups.append(state["param_groups"][0] | {"weight_decay": group.weight_decay, "params": ids})
            start += len(ids)
        return {
            "state": {j: entry for j, entry in moved.items() if entry is not None},
            "param_groups": groups,
        }

    def free(self) -> None:
        for group in self.groups:
            group.free()


class _FlatGroup:
    """One decay group's flat buffers and each parameter's views into them."""

    def __init__(self, params: list[nn.Parameter], weight_decay: float):
        self.params, self.weight_decay = params, weight_decay
        first = params[0]
        total = sum(p.numel() for p in params)
        self.master = torch.empty(total, dtype=torch.float32, device=first.device)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.grad = torch.zeros(total, dtype=first.dtype, device=first.device)
        self.step = torch.zeros((), dtype=torch.float32, device=first.device)
        self.count = 0  # steps taken, on the host
        self.masters, self.exp_avgs, self.exp_avg_sqs, self.grads = [], [], [], []
        offset = 0
        with torch.no_grad():
            for param in params:
                if (param.dtype, param.device) != (first.dtype, first.device):
                    raise ValueError("a flat optimizer group needs one dtype and device")
                view = slice(offset, offset + param.numel())
                offset += param.numel()
                self.masters.append(self.master[view].view(param.shape))
                self.masters[-1].copy_(param)
                self.exp_avgs.append(self.exp_avg[view].view(param.shape))
                self.exp_avg_sqs.append(self.exp_avg_sq[view].view(param.shape))
                self.grads.append(self.grad[view].view(param.shape))
                param.grad = self.grads[-1]

    def gather_grads(self) -> None:
        """A `.grad` someone replaced (`p.grad = tensor`, or None) back into its view of the buffer."""
        for param, view in zip(self.params, self.grads, strict=True):
            if param.grad is not view:
                if param.grad is None:
                    view.zero_()
                else:
                    view.copy_(param.grad)
                param.grad = view

    def reattach_grads(self) -> None:
        for param, view in zip(self.params, self.grads, strict=True):
            if param.grad is not view:
                param.grad = view

    def round_into_params(self) -> None:
        torch._foreach_copy_(self.params, self.masters)

    def free(self) -> None:
        for param in self.params:
            param.grad = None
        empty = torch.empty(0, device=self.master.device)
        self.exp_avg = self.exp_avg_sq = self.grad = empty
        self.exp_avgs, self.exp_avg_sqs, self.grads = [], [], []


def make_optimizer(trainable: list[nn.Parameter], lr: float, weight_decay: float) -> Optimizer:
    """fp32 masters where the trainable weights are low precision (flat buffers unless
    CAI_TRAIN_OPTIMIZER=grouped); plain AdamW on fp32 ones."""
    if any(p.dtype != torch.float32 for p in trainable):
        # Flat buffers hold one dtype and device: mixed ones (as a LoRA with fp32 adapters) step grouped.
        uniform = len({(p.dtype, p.device) for p in trainable}) == 1
        if uniform and os.environ.get("CAI_TRAIN_OPTIMIZER", "flat") != "grouped":
            return FlatMasterAdamW(trainable, lr, weight_decay)
        return MasterAdamW(trainable, lr, weight_decay)
    return AdamW(trainable, lr, weight_decay)
