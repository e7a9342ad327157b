"""The GPU recipe's pieces, checked on the CPU: fp32 master weights behind a bf16 model, metrics read
one step late, token-budget batches, the FlexAttention decision. (FlexAttention's forward is in
test_logps_families; its compiled backward and the whole recipe on a GPU are in bench/gpu.sh.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai_dpo.core.training_params import LoraParams
from tests.fixtures.training import tiny_run_params
from workers.training import model as model_module
from workers.training.data import TokenizedPair, token_batches
from workers.training.loop import TrainHooks, TrainResult, run_training
from workers.training.model import PairForward, Runtime, Setup, default_runtime, settle_attention
from workers.training.optim import MasterAdamW, param_groups
from workers.training.ranks import Ranks
from workers.training.step import score_pairs, score_with


@pytest.mark.model  # torch optimizer steps; the first optimizer of a session imports torch._dynamo (1-2 s)
def test_master_adamw_is_fp32_adamw_with_the_model_in_bf16():
    torch.manual_seed(0)
    shapes = [(8, 16), (40,), (3, 5, 7)]
    reference = [torch.randn(shape).bfloat16().float().requires_grad_() for shape in shapes]
    model = [torch.nn.Parameter(p.detach().bfloat16()) for p in reference]
    # The same groups: decay on the matrices, none on the 1-D parameter (as a norm weight or a bias).
    fp32 = torch.optim.AdamW(param_groups(reference, reference, 0.1), lr=1e-2, weight_decay=0.1, fused=True)
    mixed = MasterAdamW(model, lr=1e-2, weight_decay=0.1, group_elements=100)  # several groups
    assert len(mixed.groups) > 1
    for step in range(4):
        for ref_param, param in zip(reference, model, strict=True):
            grad = (torch.randn(ref_param.shape) * (10 if step == 1 else 0.1)).bfloat16()  # step 1 clips
            ref_param.grad, param.grad = grad.float(), grad
        want_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
        fp32.step()
        norm = mixed.clip_and_step(1.0)
        mixed.zero_grad()
        assert norm.item() == pytest.approx(want_norm.item(), rel=1e-6)
        for ref_param, master, param in zip(reference, mixed.master_weights, model, strict=True):
            assert torch.allclose(master, ref_param, rtol=0, atol=1e-7)
            assert torch.equal(param, master.bfloat16())  # the model holds the masters, rounded
            assert param.grad is None
    # Updates far below bf16's resolution accumulate in the masters instead of vanishing.
    assert any(not torch.equal(m.bfloat16().float(), m) for m in mixed.master_weights)


@pytest.mark.unit
def test_token_batches_are_consecutive_and_within_budget():
    pairs = [
        TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in [(5, 3, 4), (2, 2, 2), (9, 9, 9), (1, 1, 1)]
    ]
    batches = token_batches(pairs, 20)
    assert batches == [[0, 1], [2], [3]]  # 12 + 6; 27 alone (over the budget); 3
    assert token_batches(pairs, 1000) == [[0, 1, 2, 3]]


def _run(path: Path, model_path: Path, pairs, *, lora=None, hooks=None, max_tokens=None) -> TrainResult:
    return run_training(
        tiny_run_params(lora, max_tokens_per_batch=max_tokens), model_path=model_path, train_pairs=pairs[:8],
        eval_pairs=pairs[8:10], output_dir=path, hooks=hooks, checkpoint_steps=2,
    )  # fmt: skip


def _history(model_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in {"tokens_per_s", "pairs_per_s", "mfu"}} for row in rows]


@pytest.mark.model
@pytest.mark.parametrize("lora", [None, LoraParams(r=4, alpha=8)], ids=["full", "lora"])
def test_gpu_recipe_on_the_cpu_trains_like_fp32_and_resumes_exactly(
    tiny_model_path, hh_pairs, tmp_path, monkeypatch, uninterrupted_tiny_run, lora
):
    fp32 = uninterrupted_tiny_run(lora)  # the same run in fp32, as the resume test has it
    monkeypatch.setattr(model_module, "low_precision", lambda device: True)  # bf16, masters, lagged metrics
    whole = _run(tmp_path / "whole", tiny_model_path, hh_pairs, lora=lora, max_tokens=150)

    # Same run as in fp32, up to bf16 rounding of the forward.
    for row, want in zip(_history(whole.model_dir), _history(fp32.model_dir), strict=True):
        assert row["step"] == want["step"]
        assert row["loss"] == pytest.approx(want["loss"], abs=0.05)
    assert whole.eval_after["loss"] == pytest.approx(fp32.eval_after["loss"], abs=0.05)
    weights = load_file(whole.model_dir / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # saved from the fp32 masters

    # Stopped after 3 steps (metrics one step late) and resumed: the same run, the masters restored.
    checks, steps = [], []
    hooks = TrainHooks(
        on_step=lambda step, total, metrics: steps.append(step),
        should_stop=lambda: checks.append(1) or len(checks) > 3,
    )
    stopped = _run(tmp_path / "resumed", tiny_model_path, hh_pairs, lora=lora, hooks=hooks, max_tokens=150)
    assert (stopped.status, stopped.step, steps) == ("stopped", 3, [1, 2, 3])
    resumed = _run(tmp_path / "resumed", tiny_model_path, hh_pairs, lora=lora, max_tokens=150)
    assert resumed.step == 6
    for row, want in zip(_history(resumed.model_dir), _history(whole.model_dir), strict=True):
        assert row == pytest.approx(want, rel=1e-6, abs=1e-7)
    resumed_weights = load_file(resumed.model_dir / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.allclose(resumed_weights[name], tensor, rtol=0, atol=1e-6), name


class _OtherRankFails(Ranks):
    """A group of two seen from rank 0, whose rank 1 reports that FlexAttention failed there."""

    def all_gather(self, value):
        return [value, "RuntimeError: no kernel on rank 1"]


@pytest.mark.model  # real forwards and backwards of a tiny model
def test_flex_attention_stays_where_it_works_on_every_rank_and_else_falls_back_to_sdpa(monkeypatch):
    from transformers.integrations import flex_attention as transformers_flex

    from tests.fixtures.training import tiny_model

    cpu = torch.device("cpu")
    model = tiny_model("llama", 96).eval()
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12]), TokenizedPair([13, 14], [15], [16, 17])]
    want = torch.cat(score_pairs(model, pairs, 2, 0, cpu))
    plan = default_runtime(model, cpu).plan

    # FlexAttention works here (its backward runs only on a GPU: the CPU's answer is taken as is) and
    # on every rank: kept.
    monkeypatch.setattr(model_module, "flex_failure", lambda lm, device: None)
    model.set_attn_implementation("flex_attention")
    runtime = Runtime(cpu, plan, flex=True)
    settle_attention(model, runtime, Ranks.single(cpu))
    assert runtime.flex and runtime.flex_failed is None
    assert model.config._attn_implementation == "flex_attention"
    # It works here but not on another rank: every rank goes on with SDPA.
    settle_attention(model, runtime, _OtherRankFails(0, 2, 0, cpu, None))
    assert not runtime.flex and runtime.flex_failed == "RuntimeError: no kernel on rank 1"
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.undo()

    # The kernels fail on the small copy of the architecture: the run falls back before it starts.
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", broken)
    model.set_attn_implementation("flex_attention")
    runtime = Runtime(cpu, plan, flex=True)
    settle_attention(model, runtime, Ranks.single(cpu))
    assert not runtime.flex and "no kernel for you" in runtime.flex_failed
    assert model.config._attn_implementation == "sdpa"
    got = torch.cat(
        score_with(Setup(model, PairForward(model), runtime, "single"), pairs, 2, 0, Ranks.single(cpu))
    )
    assert torch.allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_packed_rows_take_few_widths_with_bounded_padding():
    from workers.training.data import bucket_width

    widths = {bucket_width(tokens) for tokens in range(1, 20_000)}
    assert sorted(widths)[:9] == [128, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
    assert all(width % 128 == 0 for width in widths)  # FlexAttention's block
    assert all(
        bucket_width(t) >= t and bucket_width(t) - t <= bucket_width(t) / 3 for t in range(257, 20_000)
    )


@pytest.mark.unit
def test_compiled_shapes_are_warmed_before_the_first_step_with_no_change_to_the_model():
    """Issue 20, item 2: every input shape the run's steps meet is run once before step 0 (where
    torch.compile makes its graphs on a GPU), read from the step order alone, and the warm-up
    leaves no gradient and no change behind."""
    from cai_dpo.core.training_params import TrainParams
    from tests.fixtures.training import tiny_model
    from workers.training.model import collate_for, compiles_layers
    from workers.training.schedule import pairs_for_step
    from workers.training.step import forward_backward, warm_compiled_shapes

    cpu = torch.device("cpu")
    model = tiny_model("llama", 96).train()
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 96, (n,), generator=generator).tolist()

    train = [TokenizedPair(ids(2 + i % 7), ids(1 + i % 5), ids(3 + i % 4)) for i in range(24)]
    params = TrainParams(batch_size=2, gradient_accumulation=2, max_length=64)
    setup = Setup.alone(model, cpu)
    met: list[tuple] = []
    forward = setup.engine.forward

    def recording(pairs, pad_token_id, runtime):
        kind, batch = collate_for(pairs, pad_token_id, runtime)
        met.append((kind, *(tuple(value.shape) for value in batch.values())))
        return forward(pairs, pad_token_id, runtime)

    setup.engine.forward = recording
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    steps = range(0, -(-len(train) // params.pairs_per_step))
    shapes = warm_compiled_shapes(setup, train, params, 0, steps)
    warmed = set(met)
    assert shapes == len(warmed) == len(met) > 1  # each shape once, and the steps have several
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())

    met.clear()
    ref = torch.zeros(len(train))
    for step in steps:
        chosen = [train[i] for i in pairs_for_step(step, len(train), params.pairs_per_step, params.seed)]
        forward_backward(setup, chosen, ref[: len(chosen)], ref[: len(chosen)], params, 0, Ranks.single(cpu))
    assert set(met) <= warmed  # no step met a shape the warm-up had not

    # On by default on a GPU, never on the CPU; a run can say no.
    assert compiles_layers(params, torch.device("cuda")) and not compiles_layers(params, cpu)
    assert not compiles_layers(params.model_copy(update={"compile": False}), torch.device("cuda"))
