"""SFT (SL-CAI) and staged runs: `objective: "sft"` trains on each pair's prompt + chosen answer, the
loss TRL 1.16's SFTTrainer's (completion-only); `stages: ["sft", "dpo"]` runs DPO from the SFT model.

The loss and gradient are held equal to SFTTrainer's on the same tiny Llama and batch; the loop's
runs use the tiny model and a few steps, so the whole file stays quick.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cai_dpo.core.training_params import DPO_ONLY, TrainParams, trl_config
from tests.fixtures.training import tiny_llama, tiny_run_params
from workers.training.data import collate_packed, collate_shared_prompt, prepare_pairs, tokenize_pairs
from workers.training.dpo import METRIC_NAMES, objective_metrics
from workers.training.loop import TrainHooks, run_stages, run_training
from workers.training.step import accumulate_step, score_pairs

pytestmark = pytest.mark.model  # SmolLM2's tokenizer, real torch steps

CPU = torch.device("cpu")


# --- the settings -----------------------------------------------------------------------------------


def test_sft_takes_the_sft_term_alone_and_no_reference():
    params = TrainParams(objective="sft")
    assert params.loss_terms() == (["sft"], [1.0]) and params.reference_free
    assert TrainParams.model_validate(params.model_dump(mode="json")) == params  # stored, read back
    for name in DPO_ONLY:
        assert getattr(params, name) == DPO_ONLY[name] == TrainParams.model_fields[name].default


def test_stages_are_each_objective_with_its_own_settings():
    params = TrainParams(stages=["sft", "dpo"], beta=0.3, ld_alpha=0.5, save_dtype="bfloat16")
    sft, dpo = params.stage_params()
    assert (sft.objective, sft.beta, sft.ld_alpha, sft.save_dtype) == ("sft", 0.1, None, "float32")
    assert (dpo.objective, dpo.beta, dpo.ld_alpha, dpo.save_dtype) == ("dpo", 0.3, 0.5, "bfloat16")
    assert sft.stages is None and dpo.stages is None
    assert TrainParams(objective="sft").stage_params() == [TrainParams(objective="sft")]


def test_an_sft_run_writes_trl_sft_config_names():
    from trl import SFTConfig

    config = trl_config(TrainParams(objective="sft", max_steps=3), 3, bf16=False)
    assert config["completion_only_loss"] is True and "beta" not in config and "loss_type" not in config
    config.pop("use_peft")
    assert SFTConfig(output_dir="/tmp/unused", **config).max_steps == 3


def test_sft_metrics_leave_out_the_rewards():
    metrics = dict.fromkeys((*METRIC_NAMES, "grad_norm"), 1.0)
    assert set(objective_metrics("sft", metrics)) == {"loss", "logps/chosen", "grad_norm"}
    assert objective_metrics("dpo", metrics) == metrics


# --- the loss against TRL's SFTTrainer --------------------------------------------------------------


def _sft_trainer(model, tokenizer, pairs, tmp_path, max_length):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": p.prompt, "completion": [{"role": "assistant", "content": p.chosen}]} for p in pairs]
    config = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(pairs),
        max_length=max_length,
        completion_only_loss=True,
        bf16=False,
        use_cpu=True,
        report_to=[],
    )
    return SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def test_sft_loss_and_gradient_match_trl_sft_trainer(smollm_tokenizer, hh_pairs, tmp_path):
    tok, pairs, max_length = smollm_tokenizer, hh_pairs[:4], 72
    model = tiny_llama(tok, seed=0)
    ours = copy.deepcopy(model)
    trainer = _sft_trainer(model, tok, pairs, tmp_path, max_length)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    tokens = int((batch["labels"] != -100).sum())
    trl_loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(tokens))
    trl_loss.backward()

    tokenized, _, _ = prepare_pairs(tok, pairs, [], max_length, chosen_only=True)
    assert tokens == sum(len(p.chosen_ids) for p in tokenized)  # the same answer tokens, prompts masked
    params = TrainParams(objective="sft", batch_size=2, gradient_accumulation=2, max_length=max_length)
    no_ref = torch.zeros(len(tokenized))
    metrics = accumulate_step(ours, tokenized, no_ref, no_ref, params, tok.pad_token_id, CPU)
    assert metrics["loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    assert metrics["loss"] > 5  # a random model's NLL per token: a real loss
    for (name, trl_param), param in zip(trainer.model.named_parameters(), ours.parameters(), strict=True):
        assert torch.allclose(param.grad, trl_param.grad, rtol=1e-4, atol=1e-6), name


def test_a_chosen_only_batch_scores_as_the_chosen_answers_of_full_pairs(smollm_tokenizer, hh_pairs):
    tok = smollm_tokenizer
    full, _ = tokenize_pairs(tok, hh_pairs[:3], 96)
    chosen_only, _, _ = prepare_pairs(tok, hh_pairs[:3], [], 96, chosen_only=True)
    assert all(p.rejected_ids == [] for p in chosen_only)
    model = tiny_llama(tok).eval()
    expected, _ = score_pairs(model, full, 3, tok.pad_token_id, CPU)
    chosen, rejected = score_pairs(model, chosen_only, 3, tok.pad_token_id, CPU)
    assert torch.allclose(chosen, expected, rtol=0, atol=1e-4) and not rejected.any()
    for packed in (collate_packed(chosen_only, tok.pad_token_id), collate_shared_prompt(chosen_only, 0)):
        assert len(packed["targets"]) == sum(len(p.chosen_ids) for p in chosen_only)
        assert len(packed["targets"]) == len(packed.get("source", packed.get("source_pos")))


# --- runs -------------------------------------------------------------------------------------------


def test_an_sft_run_lowers_the_held_out_nll_without_a_reference_pass(
    tiny_model_path, hh_pairs, tmp_path, monkeypatch
):
    from workers.training import loop

    scored: list[int] = []
    real = loop.score_with
    monkeypatch.setattr(
        loop, "score_with", lambda setup, pairs, *a: scored.append(len(pairs)) or real(setup, pairs, *a)
    )
    params = tiny_run_params(objective="sft")
    result = run_training(
        params, model_path=tiny_model_path, train_pairs=hh_pairs[:8], eval_pairs=hh_pairs[8:10],
        output_dir=tmp_path,
    )  # fmt: skip
    assert result.status == "completed" and result.step == 6
    assert scored == [2, 2]  # the held-out pairs before and after; no reference pass
    assert set(result.eval_before) == {"loss", "logps/chosen"}
    assert result.eval_after["loss"] < result.eval_before["loss"]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"] and "rewards/accuracies" not in history[0]
    assert [row["num_tokens"] for row in history][1] > history[0]["num_tokens"] > 0
    record = json.loads((result.model_dir / "training_config.json").read_text())
    assert record["completion_only_loss"] is True and record["params"]["objective"] == "sft"


def test_two_stages_run_dpo_from_the_sft_model_and_resume(tiny_model_path, hh_pairs, tmp_path):
    params = tiny_run_params(stages=["sft", "dpo"]).model_copy(update={"max_steps": 3})
    steps: list[tuple[int, int, float]] = []
    evals: dict[str, dict] = {}
    stop_at = {"step": 5}

    def on_step(step, total, metrics):
        steps.append((step, total, metrics["stage"]))

    hooks = TrainHooks(
        on_step=on_step,
        on_eval=lambda when, metrics: evals.__setitem__(when, metrics),
        should_stop=lambda: bool(steps) and steps[-1][0] == stop_at["step"],
    )
    kwargs = dict(
        model_path=tiny_model_path, train_pairs=hh_pairs[:8], eval_pairs=hh_pairs[8:10], output_dir=tmp_path
    )
    stopped = run_stages(params, hooks=hooks, checkpoint_steps=1, **kwargs)
    assert (stopped.status, stopped.step, stopped.total_steps) == ("stopped", 5, 6)
    assert steps == [(1, 6, 0), (2, 6, 0), (3, 6, 0), (4, 6, 1), (5, 6, 1)]
    stop_at["step"] = None
    result = run_stages(params, hooks=hooks, checkpoint_steps=1, **kwargs)  # the SFT stage is not rerun
    assert (result.status, result.step, result.total_steps) == ("completed", 6, 6)
    assert steps[5:] == [(6, 6, 1)]
    sft_dir = tmp_path / "stage-0-sft" / "model"
    record = json.loads((result.model_dir / "training_config.json").read_text())
    assert result.model_dir == tmp_path / "model" and record["base_model"] == str(sft_dir)
    assert record["params"]["objective"] == "dpo" and record["loss_type"] == ["sigmoid"]
    assert result.eval_before == evals["before"] and result.eval_after == evals["after"]
    assert {"sft/loss", "sft/logps/chosen", "dpo/loss", "dpo/rewards/accuracies"} <= set(result.eval_after)
    # The DPO stage's reference is the SFT model: before any DPO update its chosen log-probs are the
    # SFT model's after its training.
    assert result.eval_before["dpo/logps/chosen"] == pytest.approx(
        result.eval_after["sft/logps/chosen"], abs=1e-3
    )
    assert result.eval_after["sft/loss"] < result.eval_before["sft/loss"]


def test_a_failed_stage_fails_the_run_naming_the_stage(monkeypatch, tmp_path):
    from workers.training import loop

    def fail(params, **kwargs):
        raise ValueError("no training pair has a response token left within max_length")

    monkeypatch.setattr(loop, "run_training", fail)
    params = TrainParams(stages=["sft", "dpo"])
    with pytest.raises(loop.StageFailed, match=r"^stage 0 \(sft\): ValueError: no training pair"):
        run_stages(params, model_path=tmp_path, train_pairs=[], eval_pairs=[], output_dir=tmp_path)
