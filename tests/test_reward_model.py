"""Reward models trained here (`objective: "reward_model"`): a one-logit classification head on the
base model, the Bradley-Terry loss of TRL 1.16's RewardTrainer (with its margin and centering terms),
and a saved folder the `reward_model` scorer reads as the run did.

The rewards are held equal to transformers' own forward, and the loss and gradient to TRL's
`RewardTrainer.compute_loss` on the same tiny Llama and batch; the runs use the tiny model and a few
steps, so the whole file stays quick.
"""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import torch

from cai_dpo.core.training_params import DPO_ONLY, REWARD_MODEL_ONLY, TrainParams, trl_config
from tests.fixtures.training import TINY
from workers.training.data import PairExample, collate, prepare_pairs
from workers.training.dpo import METRIC_NAMES, objective_metrics
from workers.training.loop import run_training
from workers.training.reward_model import bradley_terry_loss, is_reward_model, sequence_rewards
from workers.training.schedule import pairs_for_step
from workers.training.step import accumulate_step

pytestmark = pytest.mark.model  # SmolLM2's tokenizer, real torch steps

CPU = torch.device("cpu")


def tiny_reward_model(tokenizer, seed: int = 0):
    """A 2-layer, 64-wide Llama under a one-logit classification head, the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        **TINY, vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


# --- the settings -----------------------------------------------------------------------------------


def test_a_reward_model_reads_no_reference_and_keeps_dpo_settings_at_their_defaults():
    params = TrainParams(objective="reward_model", center_rewards_coefficient=0.01, use_margin=True)
    assert params.reference_free
    assert TrainParams.model_validate(params.model_dump(mode="json")) == params  # stored, read back
    changed = {
        "loss_type": "ipo", "loss_weights": [2.0], "rpo_alpha": 0.5, "cpo_alpha": 0.5, "simpo_gamma": 1.0,
        "discopop_tau": 0.1, "beta": 0.3, "ld_alpha": 0.5, "label_smoothing": 0.1,
    }  # fmt: skip
    assert set(changed) == set(DPO_ONLY)
    for name, value in changed.items():
        with pytest.raises(ValueError, match=f"{name} is a DPO setting: not with objective reward_model"):
            TrainParams(objective="reward_model", **{name: value})
    for objective in ("dpo", "sft"):
        for name in REWARD_MODEL_ONLY:
            with pytest.raises(ValueError, match=f"{name} is a reward_model setting"):
                TrainParams(objective=objective, **{name: True if name == "use_margin" else 0.1})


def test_a_reward_model_run_writes_trl_reward_config_names():
    from trl import RewardConfig

    params = TrainParams(objective="reward_model", max_steps=3, center_rewards_coefficient=0.01)
    config = trl_config(params, 3, bf16=False)
    assert "beta" not in config and "loss_type" not in config and "truncation_mode" not in config
    config.pop("use_peft")  # trl.ModelConfig's
    built = RewardConfig(output_dir="/tmp/unused", **config)
    assert (built.center_rewards_coefficient, built.max_steps, built.max_length) == (0.01, 3, 1024)


def test_reward_model_metrics_are_trl_reward_trainers():
    metrics = dict(zip(METRIC_NAMES, [0.5, 1.0, -0.5, 0.75, 1.5, 9.0, 9.0], strict=True)) | {"grad_norm": 2.0}
    assert objective_metrics("reward_model", metrics) == {
        "loss": 0.5, "accuracy": 0.75, "margin": 1.5, "mean_reward": 0.25, "rewards/chosen": 1.0,
        "rewards/rejected": -0.5, "grad_norm": 2.0,
    }  # fmt: skip


def test_the_bradley_terry_loss_and_its_terms():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    plain = bradley_terry_loss(chosen, rejected)
    assert torch.allclose(plain, -torch.nn.functional.logsigmoid(torch.tensor([2.0, -1.0])))
    with_margin = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    assert with_margin[0] > plain[0] and with_margin[1] == plain[1]
    centred = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.5)
    assert torch.allclose(centred - plain, 0.5 * torch.tensor([4.0, 1.0]))


# --- rewards and loss against transformers and TRL ----------------------------------------------------


def test_sequence_rewards_are_the_models_own_logits(smollm_tokenizer, hh_pairs):
    tok = smollm_tokenizer
    pairs, _, _ = prepare_pairs(tok, hh_pairs[:3], [], 256)
    model = tiny_reward_model(tok).eval()
    assert is_reward_model(model)
    batch = collate(pairs, tok.pad_token_id)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    for unpad in (False, True):
        ours = sequence_rewards(model, batch["input_ids"], batch["attention_mask"], unpad=unpad)
        assert torch.allclose(ours, own, atol=1e-5), unpad
    assert own.std() > 0  # the rows differ: a real comparison


def _reward_trainer(model, tokenizer, examples, tmp_path, center):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = [
        {
            "prompt": [{"role": "user", "content": e.prompt}] if isinstance(e.prompt, str) else e.prompt,
            "chosen": [{"role": "assistant", "content": e.chosen}],
            "rejected": [{"role": "assistant", "content": e.rejected}],
            "margin": e.margin,
        }
        for e in examples
    ]
    config = RewardConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_length=4096,
        center_rewards_coefficient=center, bf16=False, use_cpu=True, report_to=[],
    )  # fmt: skip
    return RewardTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def test_loss_and_gradient_match_trl_reward_trainer_with_margin_and_centering(
    smollm_tokenizer, hh_pairs, tmp_path
):
    tok = smollm_tokenizer
    examples = [PairExample(e.prompt, e.chosen, e.rejected, margin) for e, margin in zip(
        hh_pairs[:4], [0.5, 0.0, 1.5, 0.25], strict=True
    )]  # fmt: skip
    model = tiny_reward_model(tok, seed=1)
    ours = copy.deepcopy(model)
    trainer = _reward_trainer(model, tok, examples, tmp_path, center=0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    pairs, _, _ = prepare_pairs(tok, examples, [], 4096, whole=True, margins=True)
    ours_batch = collate(pairs, tok.pad_token_id)
    assert torch.equal(ours_batch["input_ids"], batch["input_ids"])  # the same tokens as TRL's
    params = TrainParams(
        objective="reward_model", batch_size=2, gradient_accumulation=2, center_rewards_coefficient=0.05,
        use_margin=True, max_length=4096,
    )  # fmt: skip
    no_ref = torch.zeros(len(pairs))
    metrics = accumulate_step(ours, pairs, no_ref, no_ref, params, tok.pad_token_id, CPU)
    # TRL centres on the batch's mean; two micro-batches of 2 sum to the same mean over 4.
    assert metrics["loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    for (name, trl_param), param in zip(trainer.model.named_parameters(), ours.parameters(), strict=True):
        assert torch.allclose(param.grad, trl_param.grad, rtol=1e-4, atol=1e-6), name
    without_margin = accumulate_step(
        copy.deepcopy(model), pairs, no_ref, no_ref, params.model_copy(update={"use_margin": False}),
        tok.pad_token_id, CPU,
    )  # fmt: skip
    assert without_margin["loss"] < metrics["loss"]  # the margins asked for more: a real term


# --- a run --------------------------------------------------------------------------------------------


def test_a_reward_model_run_saves_a_folder_the_scorer_reads_as_the_run_did(
    tiny_model_path, smollm_tokenizer, hh_pairs, tmp_path
):
    from workers.scoring.torch_scorers import RewardModelScorer

    examples = [e for e in hh_pairs if len(e.chosen) + len(e.rejected) < 600][:10]
    params = TrainParams(
        objective="reward_model", max_length=160, batch_size=2, max_steps=6, learning_rate=3e-3, seed=3
    )
    result = run_training(
        params, model_path=tiny_model_path, train_pairs=examples[:8], eval_pairs=examples[8:],
        output_dir=tmp_path,
    )  # fmt: skip
    assert result.status == "completed" and result.step == 6
    assert {"loss", "accuracy", "margin", "mean_reward"} <= set(result.eval_after)
    assert "logps/chosen" not in result.eval_after
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"] and "accuracy" in history[0]
    # num_tokens as TRL's RewardTrainer counts it: both whole sequences of every pair trained on.
    train, _, _ = prepare_pairs(smollm_tokenizer, examples[:8], [], 160, whole=True)
    first = [train[i] for i in pairs_for_step(0, len(train), params.pairs_per_step, params.seed)]
    assert history[0]["num_tokens"] == sum(p.num_tokens for p in first)
    record = json.loads((result.model_dir / "training_config.json").read_text())
    assert record["params"]["objective"] == "reward_model" and "beta" not in record
    assert "center_rewards_coefficient" in record and "truncation_mode" not in record

    # The saved folder: a one-logit classifier whose pad token is the tokenizer's, so the scorer's
    # padded batches read each row's last token, as the run read it.
    scorer = RewardModelScorer(result.model_dir)
    conversation = [{"role": "user", "content": examples[8].prompt}] if isinstance(
        examples[8].prompt, str
    ) else examples[8].prompt  # fmt: skip
    answers = [examples[8].chosen, examples[8].rejected, "No."]
    scores = asyncio.run(scorer.score(conversation, answers))
    two = [PairExample(conversation, answers[0], answers[1]), PairExample(conversation, answers[2], "-")]
    tokenized, _, _ = prepare_pairs(smollm_tokenizer, two, [], 4096)
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    assert saved.config.num_labels == 1 and saved.config.pad_token_id == smollm_tokenizer.pad_token_id
    batch = collate(tokenized, smollm_tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = sequence_rewards(saved, batch["input_ids"], batch["attention_mask"]).tolist()
    assert scores == pytest.approx([rewards[0], rewards[2], rewards[1]], abs=1e-4)  # chosen..., rejected...
    assert len(set(round(s, 4) for s in scores)) == 3


def test_a_reward_model_leaves_out_pairs_over_max_length_rather_than_cut_them(smollm_tokenizer, hh_pairs):
    tok = smollm_tokenizer
    cut, _, cut_data = prepare_pairs(tok, hh_pairs[:6], [], 96)
    whole, _, whole_data = prepare_pairs(tok, hh_pairs[:6], [], 96, whole=True)
    assert all(p.longest_sequence <= 96 for p in whole)
    assert len(whole) < len(cut) and whole_data["dropped_by_truncation"] > cut_data["dropped_by_truncation"]
    with pytest.raises(ValueError, match="no training pair's sequences fit within max_length"):
        prepare_pairs(tok, hh_pairs[:6], [], 8, whole=True)
