"""The loss family end to end: a /train job over the in-process API, trained by the real worker on
the bundled model (two tiny LoRA steps), with a weighted list of losses (DPO + the SFT term, i.e. RPO)
and with the reference-free SimPO, which runs no reference pass over the training pairs."""

from __future__ import annotations

import math

import pytest

from tests.fixtures.model import TEST_MODELS_DIR
from tests.helpers import import_hh, train_to_the_end
from workers.training import loop

pytestmark = pytest.mark.model  # real torch training on the bundled model

TINY_RUN = {
    "dataset": {"source": "hh"},
    "max_steps": 2,
    "batch_size": 2,
    "max_length": 128,
    "learning_rate": 1e-4,
    "eval_fraction": 0.25,
    "lora": {"r": 4},
    "evaluate": False,  # no judged win rate here: the held-out pairs' metrics are enough
}


@pytest.mark.parametrize(
    "objective",
    [
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
    ],
    ids=["sigmoid+sft", "simpo"],
)
def test_a_loss_list_and_simpo_train_over_the_api(
    bundled_model_path, client, settings, db, monkeypatch, objective
):
    settings = settings.model_copy(update={"models_dir_override": TEST_MODELS_DIR})
    import_hh(client, 12)
    scored: list[int] = []  # pairs per scoring pass: the reference pass is one over the train pairs
    real_score_with = loop.score_with

    def counting_score_with(setup, pairs, *args):
        scored.append(len(pairs))
        return real_score_with(setup, pairs, *args)

    monkeypatch.setattr(loop, "score_with", counting_score_with)
    train_id = train_to_the_end(client, settings, db, {**TINY_RUN, **objective})
    state = client.get(f"/train/{train_id}").json()
    assert state["status"] == "succeeded", state["error"]
    assert state["params"]["loss_type"] == objective["loss_type"]
    assert state["step"] == state["total_steps"] == 2
    metrics = client.get(f"/train/{train_id}/metrics").json()
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics), metrics
    for when in ("eval_before", "eval_after"):
        assert math.isfinite(state[when]["loss"]) and "rewards/accuracies" in state[when]
    assert state["n_eval_pairs"] > 0
    # Scoring passes, in pairs (those that fit max_length): the reference pass over the training
    # pairs, then the held-out pairs before and after. SimPO has no reference pass.
    if objective["loss_type"] == "simpo":
        assert len(scored) == 2 and scored[0] == scored[1] > 0, scored
    else:
        assert len(scored) == 3 and scored[0] > scored[1] == scored[2] > 0, scored


def test_an_sft_run_over_the_api_lowers_the_nll_of_the_chosen_answers(
    bundled_model_path, client, settings, db
):
    settings = settings.model_copy(update={"models_dir_override": TEST_MODELS_DIR})
    import_hh(client, 12)
    train_id = train_to_the_end(client, settings, db, {**TINY_RUN, "objective": "sft", "learning_rate": 1e-3})
    state = client.get(f"/train/{train_id}").json()
    assert state["status"] == "succeeded", state["error"]
    assert state["params"]["objective"] == "sft" and state["model"] is not None
    metrics = client.get(f"/train/{train_id}/metrics").json()
    assert [m["step"] for m in metrics] == [1, 2] and "rewards/accuracies" not in metrics[0]
    assert metrics[1]["num_tokens"] > metrics[0]["num_tokens"] > 0
    # eval_*.loss: the held-out chosen answers' NLL per token (TRL SFTTrainer's eval_loss)
    assert state["eval_after"]["loss"] < state["eval_before"]["loss"], (
        state["eval_before"],
        state["eval_after"],
    )
