"""Fast checks of the DPO math, the learning-rate schedule, the data order and its shares across
ranks, and the parameter model."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from cai_dpo.core.training_params import TrainParams
from workers.training import dpo
from workers.training.dpo import batch_metrics, dpo_loss
from workers.training.schedule import learning_rate_at, pairs_for_step, shard_pairs, total_steps_for

pytestmark = pytest.mark.unit


def _logps(chosen_ratio: list[float], rejected_ratio: list[float]):
    """Policy and reference log-probs with the given log-ratios (reference values arbitrary)."""
    ref_chosen = torch.tensor([-40.0, -12.5, -7.0][: len(chosen_ratio)])
    ref_rejected = torch.tensor([-35.0, -20.0, -3.0][: len(rejected_ratio)])
    return (
        ref_chosen + torch.tensor(chosen_ratio),
        ref_rejected + torch.tensor(rejected_ratio),
        ref_chosen,
        ref_rejected,
    )


def test_sigmoid_known_values_and_rewards():
    policy_c, policy_r, ref_c, ref_r = _logps([1.0, 0.0, -2.0], [0.0, 0.0, 1.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    margins = torch.tensor([1.0, 0.0, -3.0])
    assert torch.allclose(losses, torch.log1p(torch.exp(-0.5 * margins)))
    assert losses[1].item() == pytest.approx(math.log(2))
    assert torch.allclose(chosen_rewards, torch.tensor([0.5, 0.0, -1.0]))
    assert torch.allclose(rejected_rewards, torch.tensor([0.0, 0.0, 0.5]))
    assert not chosen_rewards.requires_grad


def test_sigmoid_swapping_chosen_and_rejected_shifts_loss_by_the_margin():
    policy_c, policy_r, ref_c, ref_r = _logps([0.7, -1.3], [-0.2, 0.4])
    forward, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.3)
    swapped, _, _ = dpo_loss(policy_r, policy_c, ref_r, ref_c, beta=0.3)
    delta = (policy_c - ref_c) - (policy_r - ref_r)
    # -logσ(x) + logσ(-x) = -x
    assert torch.allclose(forward - swapped, -0.3 * delta, atol=1e-6)


def test_hinge_known_values():
    policy_c, policy_r, ref_c, ref_r = _logps([2.0, 0.0, 30.0], [0.0, 0.0, 0.0])
    losses, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1, loss_type="hinge")
    assert torch.allclose(losses, torch.tensor([0.8, 1.0, 0.0]))


def test_ipo_normalises_log_ratios_by_response_length():
    policy_c, policy_r, ref_c, ref_r = _logps([4.0, 0.0], [-6.0, 0.0])
    lengths_c, lengths_r = torch.tensor([2, 5]), torch.tensor([3, 1])
    losses, chosen_rewards, _ = dpo_loss(
        policy_c, policy_r, ref_c, ref_r, 0.25, "ipo", chosen_lengths=lengths_c, rejected_lengths=lengths_r
    )
    # (4/2 - (-6/3) - 1/(2·0.25))² = (4 - 2)² ; zero ratios: (0 - 2)²
    assert torch.allclose(losses, torch.tensor([4.0, 4.0]))
    assert torch.allclose(chosen_rewards, torch.tensor([1.0, 0.0]))  # rewards stay β·(summed log-ratio)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.25, "ipo")


def test_robust_reduces_to_sigmoid_without_noise_and_is_unbiased_under_label_flips():
    policy_c, policy_r, ref_c, ref_r = _logps([0.9, -0.4, 2.0], [0.1, 0.3, -1.0])
    sigmoid, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.2)
    robust0, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.2, "robust", 0.0)
    assert torch.allclose(robust0, sigmoid)
    eps = 0.2
    kept, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.2, "robust", eps)
    flipped, _, _ = dpo_loss(policy_r, policy_c, ref_r, ref_c, 0.2, "robust", eps)
    # rDPO's point: with labels flipped at rate eps, the expected loss is the clean DPO loss.
    assert torch.allclose((1 - eps) * kept + eps * flipped, sigmoid, atol=1e-6)


def test_sigmoid_label_smoothing_is_conservative_dpo():
    policy_c, policy_r, ref_c, ref_r = _logps([1.5, -0.5], [0.0, 0.5])
    smoothed, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.1, "sigmoid", 0.1)
    logits = 0.1 * ((policy_c - ref_c) - (policy_r - ref_r))
    assert torch.allclose(smoothed, -0.9 * F.logsigmoid(logits) - 0.1 * F.logsigmoid(-logits))
    half, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.1, "sigmoid", 0.5)
    swapped, _, _ = dpo_loss(policy_r, policy_c, ref_r, ref_c, 0.1, "sigmoid", 0.5)
    assert torch.allclose(half, swapped)  # no preference left at 0.5


def test_unknown_loss_type_raises():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(x, x, x, x, 0.1, "kto")


def test_batch_metrics_names_and_values():
    metrics = batch_metrics(
        torch.tensor([0.5, 1.5]),
        torch.tensor([0.2, -0.1]),
        torch.tensor([0.1, 0.3]),
        torch.tensor([-10.0, -20.0]),
        torch.tensor([-30.0, -40.0]),
    )
    assert metrics == pytest.approx(
        {
            "loss": 1.0,
            "rewards/chosen": 0.05,
            "rewards/rejected": 0.2,
            "rewards/accuracies": 0.5,
            "rewards/margins": -0.15,
            "logps/chosen": -15.0,
            "logps/rejected": -35.0,
        }
    )


@pytest.mark.parametrize(
    ("scale", "softcap"),
    [(1.0, None), (0.125, None), (1.0, 2.0), (0.25, 30.0)],
    ids=["plain", "scaled", "capped", "both"],
)
def test_chunked_log_probs_match_full_log_softmax_with_gradients(monkeypatch, scale, softcap):
    monkeypatch.setattr(dpo, "_HEAD_CHUNK", 7)  # several slices, the last one partial
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = (4 * torch.randn(50, 16, dtype=torch.float64)).requires_grad_()  # logits far past a cap of 2
    targets = torch.randint(0, 50, (23,))
    upstream = torch.randn(23, dtype=torch.float64)
    ours = dpo._ChunkedTokenLogProbs.apply(hidden, weight, targets, scale, softcap, 7)
    grad_hidden, grad_weight = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    logits = dpo.LogitTransform(scale, softcap).apply(hidden @ weight.t())
    full = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    want_hidden, want_weight = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    # The forward keeps its statistics in float32 whatever the input dtype.
    assert torch.allclose(ours.double(), full, atol=1e-4)
    assert torch.allclose(grad_hidden, want_hidden, atol=1e-4)
    assert torch.allclose(grad_weight, want_weight, atol=1e-4)


def test_chunked_log_probs_in_bfloat16_stay_close_to_float64():
    torch.manual_seed(1)
    hidden = torch.randn(40, 32, dtype=torch.float64)
    weight = torch.randn(300, 32, dtype=torch.float64) / 2
    targets = torch.randint(0, 300, (40,))
    full = (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    ours = dpo._ChunkedTokenLogProbs.apply(hidden.bfloat16(), weight.bfloat16(), targets, 1.0, None, 16)
    assert ours.dtype == torch.float32
    assert ((ours.double() - full).norm() / full.norm()).item() < 1e-2  # bf16 operands, fp32 sums


def test_logit_transform_reads_each_family_as_trl():
    from types import SimpleNamespace as Config

    assert dpo.logit_transform(Config(model_type="llama")) == dpo.LogitTransform()
    assert dpo.logit_transform(Config(model_type="gemma2", final_logit_softcapping=30.0)).softcap == 30.0
    assert dpo.logit_transform(Config(model_type="cohere", logit_scale=0.0625)).scale == 0.0625
    assert dpo.logit_transform(Config(model_type="granite", logits_scaling=8.0)).scale == 0.125
    assert dpo.logit_transform(Config(model_type="hyperclovax", logits_scaling=4.0)).scale == 4.0
    assert dpo.logit_transform(Config(model_type="falcon_h1", lm_head_multiplier=0.5)).scale == 0.5


# --- learning-rate schedule and data order ------------------------------------------------------


def test_linear_schedule_warms_up_then_decays_to_zero():
    lrs = [learning_rate_at(step, 10, 1e-3, 2, "linear") for step in range(10)]
    assert lrs[0] == pytest.approx(1e-3 / 3)  # no wasted zero-lr step
    assert lrs[1] == pytest.approx(2e-3 / 3)
    assert lrs[2] == pytest.approx(1e-3)  # peak right after warmup
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[9] == pytest.approx(1e-3 / 8)
    assert learning_rate_at(10, 10, 1e-3, 2, "linear") == pytest.approx(0.0)


def test_cosine_schedule_and_no_warmup():
    assert learning_rate_at(0, 8, 1.0, 0, "cosine") == pytest.approx(1.0)
    assert learning_rate_at(4, 8, 1.0, 0, "cosine") == pytest.approx(0.5)
    assert learning_rate_at(0, 8, 1.0, 0, "linear") == pytest.approx(1.0)
    assert learning_rate_at(6, 8, 1.0, 0, "cosine") < learning_rate_at(6, 8, 1.0, 0, "linear")


def test_data_order_covers_each_epoch_once_and_depends_only_on_seed_and_step():
    n, per_step = 10, 4  # 3 steps per epoch, the last one with 2 pairs
    epoch0 = [pairs_for_step(step, n, per_step, seed=7) for step in range(3)]
    epoch1 = [pairs_for_step(step, n, per_step, seed=7) for step in range(3, 6)]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(sum(epoch0, [])) == list(range(n)) == sorted(sum(epoch1, []))
    assert epoch0 != epoch1
    assert pairs_for_step(4, n, per_step, seed=7) == epoch1[1]
    assert pairs_for_step(0, n, per_step, seed=8) != epoch0[0]


def test_a_steps_pairs_are_shared_out_by_load_and_one_rank_takes_them_in_order():
    assert shard_pairs([5, 40, 10, 30, 20], 1, by_tokens=True) == [[0, 1, 2, 3, 4]]
    # The longest first, each to the rank with the least tokens (or pairs) so far; each in step order.
    assert shard_pairs([5, 40, 10, 30, 20], 2, by_tokens=True) == [[0, 1, 2], [3, 4]]
    assert shard_pairs([100, 1, 1, 1], 2, by_tokens=True) == [[0], [1, 2, 3]]
    assert shard_pairs([100, 1, 1, 1], 2, by_tokens=False) == [[0, 3], [1, 2]]
    assert shard_pairs([7, 7], 3, by_tokens=False) == [[0], [1], []]  # a rank with none


def test_total_steps_max_steps_wins():
    assert total_steps_for(TrainParams(batch_size=2, gradient_accumulation=2, epochs=3), 10) == 9
    assert total_steps_for(TrainParams(batch_size=2, epochs=3, max_steps=4), 10) == 4


# --- parameters ----------------------------------------------------------------------------------


def test_params_reject_unknown_fields_and_inconsistent_values():
    with pytest.raises(ValidationError, match="extra"):
        TrainParams(learnin_rate=1e-5)
    with pytest.raises(ValidationError, match="max_prompt_length"):
        TrainParams(max_length=128, max_prompt_length=128)
    with pytest.raises(ValidationError, match="label_smoothing"):
        TrainParams(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValidationError):
        TrainParams(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValidationError):
        TrainParams(beta=0)
    with pytest.raises(ValidationError, match="extra"):
        TrainParams.model_validate({"lora": {"r": 8, "rank": 8}})
    params = TrainParams.model_validate({"loss_type": "robust", "label_smoothing": 0.1, "lora": {"r": 8}})
    assert params.lora.r == 8 and params.lora.target_modules is None


def test_config_imports_without_torch():
    code = "import sys, cai_dpo.core.training_params; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
