"""Held out means held out: the split is by prompt (a hash of its normalised messages), the same in
the export, a training job's `eval_fraction` and the evaluation's default prompts, so every pair of
a prompt falls on one side; an evaluation says how many of its prompts the model learned from."""

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import select

from cai_dpo.core.db import session_scope
from cai_dpo.core.evaluation import EvaluationRequest
from cai_dpo.core.export_format import prompt_key, prompt_split
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.tables import Pair, TrainingJob
from cai_dpo.core.training_params import TrainParams
from workers.training.worker import TrainingWorker, prompts_in_training, split_train_eval


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.unit
def test_prompt_split_is_stable_close_to_the_fraction_and_nested():
    prompts = [user(f"question {i}") for i in range(5000)]
    sides = [prompt_split(p, 0.2) for p in prompts]
    assert sides == [prompt_split(p, 0.2) for p in prompts]
    assert 0.18 < sides.count("test") / 5000 < 0.22
    assert {prompt_split(p, 0.0) for p in prompts[:200]} == {"train"}
    assert {prompt_split(p, 1.0) for p in prompts[:200]} == {"test"}
    # A prompt held out at a fraction is held out at every larger one.
    small = {i for i, p in enumerate(prompts) if prompt_split(p, 0.05) == "test"}
    large = {i for i, p in enumerate(prompts) if prompt_split(p, 0.1) == "test"}
    assert small and small < large
    # Both sides non-empty at the fractions people use, even for a few dozen prompts.
    for fraction in (0.05, 0.1, 0.2, 0.5):
        assert {prompt_split(p, fraction) for p in prompts[:100]} == {"train", "test"}


@pytest.mark.unit
def test_the_same_prompt_is_the_same_key_whatever_its_whitespace():
    assert (
        prompt_key("What is  a gun?\n")
        == prompt_key(user("What is a gun?"))
        == prompt_key(user(" What is a gun?"))
    )
    assert prompt_key([{"role": " User", "content": "hi", "name": "x"}]) == prompt_key(user("hi"))
    assert prompt_key(user("What is a gun?")) != prompt_key(user("What is a gut?"))
    system = [{"role": "system", "content": "hi"}]
    assert prompt_key(system + user("x")) != prompt_key(user("hi") + user("x"))


@pytest.mark.unit
def test_prompt_split_is_the_same_in_another_process():
    """A hash of the text, never Python's (salted per process) `hash`: pinned, and rerun elsewhere."""
    assert prompt_key(user("hello")).hex()[:16] == PINNED_HELLO_KEY
    prompts = [user(f"question {i}") for i in range(300)]
    here = [prompt_split(p, 0.3) for p in prompts]
    code = (
        "import json, sys\nfrom cai_dpo.core.export_format import prompt_split\n"
        "prompts = json.load(sys.stdin)\nprint(json.dumps([prompt_split(p, 0.3) for p in prompts]))"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(out.stdout) == here


PINNED_HELLO_KEY = "2ccaa8cd8a2fddfc"


@pytest.mark.unit
def test_every_pair_of_a_prompt_falls_on_one_side():
    # Three rounds of 40 prompts: pair ids interleave the rounds, as the service's loop makes them.
    pairs = [(round_ * 40 + i + 1, user(f"prompt {i}")) for round_ in range(3) for i in range(40)]
    train, held = split_train_eval(pairs, 0.25)
    assert sorted(train + held) == [pair_id for pair_id, _ in sorted(pairs)]
    prompt_of = dict(pairs)
    held_prompts = {prompt_key(prompt_of[i]) for i in held}
    assert held_prompts and not held_prompts & {prompt_key(prompt_of[i]) for i in train}
    assert len(held) == 3 * len(held_prompts)  # every round's pair of a held-out prompt
    trained = [prompt_of[i] for i in train]
    assert prompts_in_training([prompt_of[i] for i in held], trained) == []
    assert prompts_in_training([user("prompt 0 "), user("new")], [user("prompt 0")]) == [0]


# --- two rounds of the service's loop, in the database ---------------------------------------------


def insert_round(db, n: int, model: str) -> None:
    with session_scope(db) as session:
        session.execute(
            Pair.__table__.insert(),
            [
                {
                    "source": "test",
                    "constitution_name": "harmless",
                    "prompt": user(f"prompt {i}"),
                    "chosen": f"chosen {i} by {model}",
                    "rejected": f"rejected {i} by {model}",
                    "trajectory": {"principles": ["harm"], "rounds": []},
                    "flags": [],
                    "model": model,
                }
                for i in range(n)
            ],
        )


def queue_job(db, trainer: TrainingWorker, base_model: str) -> int:
    with session_scope(db) as session:
        job = training_queries.create_training_job(
            session,
            base_model=base_model,
            dataset={"constitution": "harmless"},
            params={"eval_fraction": 0.1},
        )
        job.status, job.lease_owner = "running", trainer.id
        return job.id


def snapshot(db, trainer: TrainingWorker, train_id: int) -> tuple[list[int], list[int]]:
    with session_scope(db) as session:
        job = training_queries.get_training_job(session, train_id)
        session.expunge(job)
    result = asyncio.run(trainer.snapshot_pairs(job, TrainParams(eval_fraction=0.1)))
    with session_scope(db) as session:
        session.get(TrainingJob, train_id).status = "succeeded"
    return result


def evaluate(db, trainer: TrainingWorker, train_id: int, prompts: list[str] | None) -> dict[str, Any]:
    with session_scope(db) as session:
        evaluation_queries.create_evaluation(
            session, train_id, EvaluationRequest(prompts=prompts, max_prompts=2000)
        )
        evaluation = evaluation_queries.claim_evaluation(
            session, worker_id=trainer.id, lease_seconds=60, max_attempts=3
        )
    asyncio.run(trainer.evaluate(evaluation))
    with session_scope(db) as session:
        evaluation = evaluation_queries.latest_evaluation(session, train_id)
        assert evaluation.status == "comparing", evaluation.last_error
        return evaluation_queries.comparison_summary(session, evaluation.compare_job_id)


@pytest.mark.db
def test_two_rounds_over_the_same_prompts_train_on_no_held_out_prompt(client, settings, db):
    trainer = TrainingWorker(settings, db, url=settings.database_url)
    insert_round(db, 100, "smollm2-135m-instruct")
    first = queue_job(db, trainer, "smollm2-135m-instruct")
    train_1, held_1 = snapshot(db, trainer, first)
    insert_round(db, 100, f"train:{first}")  # the next round, generated by the trained model
    second = queue_job(db, trainer, f"train:{first}")
    train_2, held_2 = snapshot(db, trainer, second)

    with session_scope(db) as session:
        prompt_of = dict(session.execute(select(Pair.id, Pair.prompt)).all())
        trained = training_queries.trained_prompts(session, second)
        held_out = evaluation_queries.held_out_prompts(
            session, training_queries.get_training_job(session, second), 2000
        )
    assert len(train_2) + len(held_2) == 200 and held_2
    assert {prompt_key(prompt_of[i]) for i in held_2} == {prompt_key(prompt_of[i]) for i in held_1}
    assert len(trained) == 100 - len(held_out)  # both jobs' training prompts, each once
    assert prompts_in_training(held_out, trained) == []  # the pair-id split had 11 of 12 here

    # The evaluation says so: 0 for the default prompts; given prompts the model saw are listed.
    default = evaluate(db, trainer, second, None)
    assert default["prompts_in_training"] == {"n": 0, "prompts": []}
    seen = prompt_of[train_1[0]][0]["content"]
    given = evaluate(db, trainer, second, [seen, "a prompt nobody trained on"])
    assert given["prompts_in_training"] == {"n": 1, "prompts": [user(seen)]}
    state = client.get(f"/train/{second}").json()["evaluation"]
    assert state["win_rate"]["prompts_in_training"]["n"] == 1
    page = client.get(f"/ui/train/{second}").text  # the console's run page says it too
    assert "training pairs: <strong>1</strong> (they measure what it learned" in page

    # The export's split is the training split at the same fraction.
    def exported(split: str) -> set[int]:
        body = client.get("/export", params={"metadata": True, "split": split, "test_fraction": 0.1}).content
        return {json.loads(line)["id"] for line in body.decode().splitlines()}

    assert exported("test") == set(held_2) and exported("train") == set(train_2)
