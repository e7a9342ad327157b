"""Every loss of the family against TRL 1.16's own code on the same random batch: values and gradients.

The DPO family runs TRL's `DPOTrainer._compute_loss` itself, with a stand-in for the model that
returns the batch's per-token log-probs (TRL's fused LM head output) and the reference log-probs
precomputed, so TRL's loss code is what runs, on exactly our four log-prob tensors. SimPO runs TRL's
`trl.experimental.cpo.CPOTrainer.cpo_loss` (loss_type="simpo") and ORPO
`trl.experimental.orpo.ORPOTrainer.odds_ratio_loss`, each on the length-averaged log-probs TRL's
`get_batch_logps(average_log_prob=True)` gives from random logits, plus the chosen answers' NLL as
their `concatenated_forward` computes it (a cross entropy over the shifted chosen labels).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from cai_dpo.core.training_params import TrainParams
from workers.training.dpo import DPO_LOSS_TYPES, dpo_loss, length_desensitised_weights, needs_reference

pytestmark = pytest.mark.unit

PAIRS, WIDTH = 5, 12  # pairs, tokens per row (prompt, answer, padding)


def _batch(seed: int = 0):
    """Per-token log-probs of [chosen..., rejected...] rows (zero outside the answers), TRL's
    completion mask over the input ids, and the reference's summed log-probs."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * PAIRS,), generator=generator)
    answer = torch.randint(1, WIDTH - 4, (2 * PAIRS,), generator=generator)
    positions = torch.arange(WIDTH)
    completion_mask = ((positions >= prompt[:, None]) & (positions < (prompt + answer)[:, None])).long()
    shift = completion_mask[:, 1:].bool()
    per_token = -torch.rand(2 * PAIRS, WIDTH - 1, generator=generator, dtype=torch.float64) * 3
    per_token = (per_token * shift).requires_grad_()
    ref = (-torch.rand(2 * PAIRS, WIDTH - 1, generator=generator, dtype=torch.float64) * 3 * shift).sum(1)
    return per_token, completion_mask, ref


def _trl_dpo(per_token, completion_mask, ref, loss_types, loss_weights=None, ld_alpha=None, **args):
    """TRL 1.16's DPOTrainer._compute_loss on these log-probs (the model stand-in returns them)."""
    from trl import DPOTrainer

    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    model.__call__ = None  # a plain namespace is not callable: wrap it

    class Model:
        training = True

        def __call__(self, **kwargs):
            return outputs

    same = lambda x: x  # noqa: E731 - one process: gathering is the identity
    trainer = SimpleNamespace(
        model=Model(),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=same, gather=same),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=args.get("beta", 0.1),
        label_smoothing=args.get("label_smoothing", 0.0),
        args=SimpleNamespace(discopop_tau=args.get("discopop_tau", 0.05)),
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _ours(per_token, completion_mask, ref, loss_types, loss_weights=None, **args):
    logps = per_token.sum(1)
    lengths = completion_mask.sum(1)
    (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), ref.chunk(2)
    c_len, r_len = lengths.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, args.get("beta", 0.1), loss_types,
        args.get("label_smoothing", 0.0), chosen_lengths=c_len, rejected_lengths=r_len,
        loss_weights=loss_weights, discopop_tau=args.get("discopop_tau", 0.05),
    )  # fmt: skip
    return losses, chosen_rewards, rejected_rewards


CASES = [([name], None, {}) for name in DPO_LOSS_TYPES if name not in ("exo_pair",)]
CASES += [
    (["exo_pair"], None, {"label_smoothing": 1e-3}),
    (["robust"], None, {"label_smoothing": 0.2}),
    (["aot"], None, {"label_smoothing": 0.1}),
    (["discopop"], None, {"discopop_tau": 0.3, "beta": 0.5}),
    (["sigmoid", "sft"], [1.0, 0.7], {}),  # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {"beta": 0.3}),  # MPO-style mixture
    (["apo_zero", "ipo", "sigmoid_norm"], None, {"beta": 2.0}),
]


@pytest.mark.parametrize(("loss_types", "weights", "args"), CASES, ids=lambda c: str(c))
def test_each_dpo_loss_and_its_gradient_equal_trls(loss_types, weights, args):
    per_token, completion_mask, ref = _batch()
    trl_loss, trl_metrics = _trl_dpo(per_token, completion_mask, ref, loss_types, weights, **args)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)
    losses, chosen_rewards, rejected_rewards = _ours(
        per_token, completion_mask, ref, loss_types, weights, **args
    )
    loss = losses.mean()
    (grad,) = torch.autograd.grad(loss, per_token)
    # float64 log-probs; TRL makes some constants float32 (exo_pair's epsilon): 1e-6 covers that.
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-12)
    assert abs(loss.item()) > 1e-3  # a real loss, not 0 = 0
    answers = completion_mask[:, 1:].bool()  # the log-probs that exist: the answers' tokens
    assert torch.allclose(grad[answers], trl_grad[answers], rtol=1e-6, atol=1e-12)
    assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][-1])
    assert rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][-1])


def test_the_sft_term_of_micro_batches_is_the_steps_per_token_mean():
    per_token, completion_mask, ref = _batch(seed=3)
    logps, lengths = per_token.sum(1), completion_mask.sum(1)
    chosen, rejected = logps.chunk(2)
    c_len, r_len = lengths.chunk(2)
    whole, _, _ = dpo_loss(
        chosen, rejected, *ref.chunk(2), 0.1, ["sft"], chosen_lengths=c_len, rejected_lengths=r_len
    )
    parts = [
        dpo_loss(chosen[s], rejected[s], *(r[s] for r in ref.chunk(2)), 0.1, ["sft"], chosen_lengths=c_len[s],
                 rejected_lengths=r_len[s], chosen_tokens_per_pair=c_len.sum() / PAIRS)[0]
        for s in (slice(0, 2), slice(2, None))
    ]  # fmt: skip
    assert (torch.cat(parts).sum() / PAIRS).item() == pytest.approx(whole.mean().item())
    assert whole.mean().item() == pytest.approx(-(chosen.sum() / c_len.sum()).item())


# --- SimPO and ORPO: TRL's experimental CPOTrainer and ORPOTrainer --------------------------------


def _logits_batch(seed: int = 0, vocab: int = 11):
    """Random logits and TRL-style labels (-100 on the prompt and padding) for [chosen..., rejected...]."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * PAIRS, WIDTH, vocab, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, vocab, (2 * PAIRS, WIDTH), generator=generator)
    _, completion_mask, _ = _batch(seed)
    labels = labels.masked_fill(completion_mask == 0, -100)
    return logits, labels, completion_mask


def _our_logps(logits, completion_mask, labels):
    shift = completion_mask[:, 1:].bool()
    per_token = logits[:, :-1].log_softmax(-1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(2)
    return (per_token * shift).sum(1), shift.sum(1)


def _trl_nll(logits, labels):
    """The chosen answers' NLL as CPOTrainer/ORPOTrainer.concatenated_forward compute it."""
    chosen_logits, chosen_labels = logits[:PAIRS, :-1], labels[:PAIRS, 1:]
    return torch.nn.CrossEntropyLoss()(
        chosen_logits.reshape(-1, chosen_logits.shape[-1]), chosen_labels.reshape(-1)
    )


@pytest.mark.parametrize(
    ("beta", "gamma", "smoothing", "cpo_alpha"), [(2.0, 0.5, 0.0, 0.0), (0.5, 1.2, 0.1, 1.0)]
)
def test_simpo_equals_trls_cpo_trainer(beta, gamma, smoothing, cpo_alpha):
    from trl.experimental.cpo import CPOTrainer

    logits, labels, completion_mask = _logits_batch()
    averages = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trainer = SimpleNamespace(
        alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=smoothing,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(trainer, *averages.chunk(2))
    trl_loss = trl_losses.mean() + cpo_alpha * _trl_nll(logits, labels)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)

    logps, lengths = _our_logps(logits, completion_mask, labels)
    names, weights = ["simpo", "sft"], [1.0, cpo_alpha]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *logps.chunk(2), torch.zeros(PAIRS), torch.zeros(PAIRS), beta, names, smoothing,
        chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:], loss_weights=weights,
        simpo_gamma=gamma,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(losses.mean(), logits)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-6)  # TRL's ORPO is float32
    assert torch.allclose(grad, trl_grad, rtol=1e-5, atol=1e-9)
    assert torch.allclose(chosen_rewards.float(), trl_chosen_rewards.float())
    assert torch.allclose(rejected_rewards.float(), trl_rejected_rewards.float())


def test_orpo_equals_trls_orpo_trainer():
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.25
    logits, labels, completion_mask = _logits_batch(seed=1)
    averages = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen_rewards, trl_rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        trainer, *averages.chunk(2)
    )
    trl_loss = _trl_nll(logits, labels) - trl_losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)

    logps, lengths = _our_logps(logits, completion_mask, labels)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *logps.chunk(2), torch.zeros(PAIRS), torch.zeros(PAIRS), beta, "orpo",
        chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:],
    )  # fmt: skip
    (grad,) = torch.autograd.grad(losses.mean(), logits)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-6)  # TRL's ORPO is float32
    assert torch.allclose(grad, trl_grad, rtol=1e-5, atol=1e-9)
    assert torch.allclose(chosen_rewards.float(), trl_chosen_rewards.float())
    assert torch.allclose(rejected_rewards.float(), trl_rejected_rewards.float())


def test_reference_free_losses_ignore_the_reference():
    per_token, completion_mask, ref = _batch(seed=2)
    for names in (["simpo"], ["orpo"], ["simpo", "sft"], ["sft"]):
        assert not needs_reference(names)
        a = _ours(per_token, completion_mask, ref, names)[0]
        b = _ours(per_token, completion_mask, ref * 0 + 7.0, names)[0]
        assert torch.equal(a, b), names
    assert needs_reference(["sigmoid", "sft"]) and needs_reference("apo_zero")


# --- the /train parameters ------------------------------------------------------------------------


def test_params_take_a_name_or_a_weighted_list_and_name_the_field_when_wrong():
    assert TrainParams(loss_type="apo_zero").loss_terms() == (["apo_zero"], [1.0])
    params = TrainParams(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert params.loss_terms() == (["sigmoid", "sft"], [1.0, 0.5]) and not params.reference_free
    assert TrainParams(loss_type="sigmoid", rpo_alpha=0.3).loss_terms() == (["sigmoid", "sft"], [1.0, 0.3])
    simpo = TrainParams(loss_type="simpo", cpo_alpha=1.0, simpo_gamma=0.8)
    assert simpo.reference_free and simpo.loss_terms() == (["simpo", "sft"], [1.0, 1.0])
    assert TrainParams(loss_type="orpo").reference_free
    for bad, field in [
        ({"loss_type": "kto"}, "loss_type"),
        ({"loss_type": []}, "loss_type"),
        ({"loss_type": ["sigmoid", "nope"]}, "loss_type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_type": ["simpo", "sigmoid"]}, "reference-free"),
        ({"loss_type": "exo_pair"}, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "sigmoid", "cpo_alpha": 1.0}, "cpo_alpha"),
    ]:
        with pytest.raises(ValidationError, match=field):
            TrainParams(**bad)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
@pytest.mark.parametrize(
    "loss_types", [["sigmoid"], ["ipo"], ["sigmoid_norm"], ["aot"], ["apo_zero", "hinge"]]
)
def test_length_desensitised_log_probs_equal_trls(loss_types, ld_alpha):
    """TRL's ld_alpha (LD-DPO) on the policy's log-probs: ours weight the same tokens, so loss and
    gradient are TRL's (the reference's are weighted alike: tests/test_ld_dpo.py)."""
    per_token, completion_mask, ref = _batch(seed=5)
    answers = completion_mask[:, 1:].bool()
    chosen_len, rejected_len = answers.sum(1).chunk(2)
    assert (chosen_len != rejected_len).all()  # every pair has a tail to weight
    trl_loss, trl_metrics = _trl_dpo(per_token, completion_mask, ref, loss_types, ld_alpha=ld_alpha)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)
    # Our layout: each answer's tokens consecutive, in order, answer i = segment i.
    segment = torch.arange(2 * PAIRS).repeat_interleave(answers.sum(1))
    flat = per_token[answers] * length_desensitised_weights(segment, 2 * PAIRS, ld_alpha)
    logps = torch.zeros(2 * PAIRS, dtype=flat.dtype).index_add(0, segment, flat)
    (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), ref.chunk(2)
    losses, chosen_rewards, _ = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, 0.1, loss_types,
        chosen_lengths=chosen_len, rejected_lengths=rejected_len,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(losses.mean(), per_token)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-12)
    assert torch.allclose(grad[answers], trl_grad[answers], rtol=1e-6, atol=1e-12)
    assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][-1])
    assert logps[:PAIRS].mean().item() == pytest.approx(trl_metrics["logps/chosen"][-1])
    plain = per_token.sum(1)
    if ld_alpha == 1.0:
        assert torch.allclose(logps, plain)
    else:  # the longer answer of each pair loses (1 - ld_alpha) of its tail, the shorter nothing
        longer = torch.cat([chosen_len > rejected_len, rejected_len > chosen_len])
        assert torch.allclose(logps[~longer], plain[~longer], rtol=0, atol=1e-12)
        assert not torch.allclose(logps[longer], plain[longer])


def test_length_desensitised_weights_by_hand():
    # pair 0: chosen 3 tokens, rejected 1; pair 1: chosen 2, rejected 4. Laid out c0 r0 c1 r1.
    segment = torch.tensor([0, 0, 0, 2, 1, 1, 3, 3, 3, 3])
    weights = length_desensitised_weights(segment, 4, 0.25)
    assert weights.tolist() == [1, 0.25, 0.25, 1, 1, 1, 1, 1, 0.25, 0.25]
