"""FlatMasterAdamW: MasterAdamW's update on flat buffers (each .grad a view into one), equal to it to
1e-7, with the same state_dict, so either resumes from the other's checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from workers.training.optim import FlatMasterAdamW, MasterAdamW, make_optimizer

SHAPES = [(8, 16), (40,), (3, 5, 7), (16,), (33, 2)]  # matrices decay; the 1-D ones do not


def _pair(dtype: torch.dtype, **flat_kwargs):
    torch.manual_seed(0)
    values = [torch.randn(shape).to(dtype) for shape in SHAPES]
    grouped = [torch.nn.Parameter(v.clone()) for v in values]
    flat = [torch.nn.Parameter(v.clone()) for v in values]
    return (
        grouped, MasterAdamW(grouped, lr=1e-2, weight_decay=0.1, group_elements=100),
        flat, FlatMasterAdamW(flat, lr=1e-2, weight_decay=0.1, **flat_kwargs),
    )  # fmt: skip


def _backward(params: list[torch.nn.Parameter], step: int) -> None:
    """A gradient of the parameters through autograd (so it lands in .grad as the trainer's does)."""
    gen = torch.Generator().manual_seed(step)
    loss = sum(
        (p * (torch.randn(p.shape, generator=gen) * (10 if step == 1 else 0.1)).to(p.dtype)).sum()
        for p in params
    )
    loss.backward()


def _steps(grouped, old, flat, new, steps: range, max_norm: float | None = 1.0) -> None:
    for step in steps:
        for lr in (1e-2 / (step + 1),):
            old.set_lr(lr)
            new.set_lr(lr)
        _backward(grouped, step)
        _backward(flat, step)
        for a, b in zip(grouped, flat, strict=True):
            assert torch.equal(a.grad, b.grad)
        want, got = old.clip_and_step(max_norm), new.clip_and_step(max_norm)
        old.zero_grad()
        new.zero_grad()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        for a, b in zip(old.master_weights, [new.masters()[id(p)] for p in flat], strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-7)
        for a, b in zip(grouped, flat, strict=True):
            assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-7)


@pytest.mark.model  # torch optimizer steps
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flat_master_adamw_equals_master_adamw_over_three_steps(dtype):
    grouped, old, flat, new = _pair(dtype, chunk_elements=64)  # several fused slices per group
    assert len(new.groups) == 2 and [g.weight_decay for g in new.groups] == [0.1, 0.0]
    grad_buffers = {g.grad.data_ptr() for g in new.groups}
    _steps(grouped, old, flat, new, range(3))  # step 1 clips
    for param in flat:  # the gradients stay views into the flat buffers, zeroed
        assert param.grad is not None and not param.grad.any()
        assert param.grad.untyped_storage().data_ptr() in grad_buffers
    # No clipping: the same again.
    _steps(grouped, old, flat, new, range(3, 5), max_norm=None)


@pytest.mark.model
def test_flat_and_grouped_resume_from_each_others_state():
    grouped, old, flat, new = _pair(torch.bfloat16)
    _steps(grouped, old, flat, new, range(2))
    # Copies, as a checkpoint reads them back (torch's load_state_dict keeps the tensors it is given).
    state_old, state_new = copy.deepcopy(old.state_dict()), copy.deepcopy(new.state_dict())
    assert state_old["state"].keys() == state_new["state"].keys()
    for i, entry in state_old["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.allclose(entry[key], state_new["state"][i][key], rtol=0, atol=1e-7), (i, key)
    assert [g["params"] for g in state_old["param_groups"]] == [
        g["params"] for g in state_new["param_groups"]
    ]

    # Each restored from the other's state and masters, as a checkpoint does: they step on alike.
    masters_old = {i: m.clone() for i, m in enumerate(old.master_weights)}
    masters_new = {i: new.masters()[id(p)].clone() for i, p in enumerate(flat)}
    grouped2, old2, flat2, new2 = _pair(torch.bfloat16)
    old2.load_masters({id(p): masters_new[i] for i, p in enumerate(grouped2)})
    old2.load_state_dict(state_new)
    new2.load_masters({id(p): masters_old[i] for i, p in enumerate(flat2)})
    new2.load_state_dict(state_old)
    _steps(grouped, old, flat2, new2, range(2, 4))
    _steps(grouped2, old2, flat, new, range(2, 4))


@pytest.mark.unit
def test_make_optimizer_takes_the_flat_one_for_uniform_low_precision_weights(monkeypatch):
    bf16 = [torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))]
    mixed = [*bf16, torch.nn.Parameter(torch.zeros(4))]
    assert isinstance(make_optimizer(bf16, 1e-3, 0.0), FlatMasterAdamW)
    assert type(make_optimizer(mixed, 1e-3, 0.0)) is MasterAdamW
    monkeypatch.setenv("CAI_TRAIN_OPTIMIZER", "grouped")
    assert type(make_optimizer(bf16, 1e-3, 0.0)) is MasterAdamW


@pytest.mark.model
def test_flat_master_adamw_resumes_a_state_from_before_the_decay_groups():
    grouped, old, flat, new = _pair(torch.bfloat16)
    _steps(grouped, old, flat, new, range(2))
    # As a checkpoint written with one group over the parameters in the model's order.
    state = copy.deepcopy(old.state_dict())
    order = [i for i, p in enumerate(grouped) if p.ndim >= 2] + [
        i for i, p in enumerate(grouped) if p.ndim < 2
    ]
    one_group = {
        "state": {order[j]: entry for j, entry in state["state"].items()},
        "param_groups": [state["param_groups"][0] | {"params": list(range(len(grouped)))}],
    }
    grouped2, old2, flat2, new2 = _pair(torch.bfloat16)
    new2.load_masters({id(q): m.clone() for q, m in zip(flat2, old.master_weights, strict=True)})
    new2.load_state_dict(one_group)
    assert [g.weight_decay for g in new2.groups] == [0.1, 0.0]
    _steps(grouped, old, flat2, new2, range(2, 4))


@pytest.mark.model
def test_a_gradient_set_from_outside_is_taken_into_the_flat_buffer():
    grouped, old, flat, new = _pair(torch.bfloat16)
    for _ in range(2):
        for a, b in zip(grouped, flat, strict=True):
            grad = torch.randn(a.shape).bfloat16()
            a.grad, b.grad = grad.clone(), grad.clone()  # replaces the view, as a hand-made gradient does
        flat[1].grad = None  # and one left without: a zero gradient here (MasterAdamW would skip it)
        grouped[1].grad = torch.zeros_like(grouped[1])
        old.clip_and_step(1.0)
        new.clip_and_step(1.0)
        old.zero_grad()
        new.zero_grad()
        for a, b in zip(old.master_weights, [new.masters()[id(p)] for p in flat], strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-7)
    assert all(
        p.grad is view for group in new.groups for p, view in zip(group.params, group.grads, strict=True)
    )
