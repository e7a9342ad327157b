"""The training API without training: validation, job records, cancel, metrics, policies."""

import asyncio
import threading

import pytest
from sqlalchemy import select

from cai_dpo.core.db import session_scope
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import policies as policy_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.tables import Pair, TrainingJob, Worker
from tests.helpers import insert_pairs

pytestmark = pytest.mark.db


def jobs(db) -> list[TrainingJob]:
    with session_scope(db) as session:
        return session.scalars(select(TrainingJob).order_by(TrainingJob.id)).all()


def test_post_train_records_a_queued_job(client, db):
    insert_pairs(db, 8)
    body = {
        "dataset": {"constitution": "harmless"},
        "loss_type": "ipo",
        "beta": 0.2,
        "max_steps": 3,
        "lora": {"r": 8},
    }
    response = client.post("/train", json=body)
    assert response.status_code == 202, response.text
    train_id = response.json()["train_id"]
    state = client.get(f"/train/{train_id}").json()
    assert state["status"] == "queued" and state["base_model"] == "smollm2-135m-instruct"
    assert state["params"]["loss_type"] == "ipo" and state["params"]["lora"]["r"] == 8
    assert state["dataset"]["constitution"] == "harmless" and state["model"] is None
    assert [j["id"] for j in client.get("/train").json()] == [train_id]
    assert client.get(f"/train/{train_id}/metrics").json() == []
    cancelled = client.post(f"/train/{train_id}/cancel").json()
    assert cancelled["status"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"loss_type": "kto"}, "loss_type"),
        ({"loss_type": ["sigmoid", "kto"]}, "loss_type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_type": ["simpo", "ipo"]}, "loss_type 'simpo' is reference-free"),
        ({"beta": 0}, "beta"),
        ({"beta": "high"}, "beta"),
        ({"label_smoothing": 0.7}, "label_smoothing"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 128, "max_prompt_length": 256}, "max_prompt_length must be smaller"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"rank": 8}}, "lora.rank"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"dataset": {"colour": "red"}}, "dataset.colour"),
        ({"evaluate": 0}, "evaluate"),  # JSON's 0 is no false: request models are strict about types
        ({"dataset": {"min_margin": False}}, "dataset.min_margin"),
        ({"batch_size": 2, "per_device_train_batch_size": 4}, "per_device_train_batch_size is TRL's name"),
        ({"lora_r": 8}, "lora_r: TRL's LoRA names need use_peft: true"),
        ({"ld_alpha": 0.5, "loss_type": ["sigmoid", "sft"]}, "ld_alpha"),
        ({"report_to": ["tensorboard", "mlflow"]}, "report_to"),
        ({"report_to": "all"}, "report_to"),  # which are installed is the worker's, not the request's
        ({"objective": "policy"}, "objective"),
        (
            {"objective": "reward_model", "beta": 0.2},
            "beta is a DPO setting: not with objective reward_model",
        ),
        ({"center_rewards_coefficient": 0.01}, "center_rewards_coefficient is a reward_model setting"),
        ({"objective": "sft", "use_margin": True}, "use_margin is a reward_model setting"),
        ({"objective": "reward_model", "evaluation": {}}, "evaluation: a reward model generates no answers"),
        ({"objective": "sft", "beta": 0.2}, "beta is a DPO setting: not with objective sft"),
        ({"objective": "sft", "loss_type": "ipo"}, "loss_type is a DPO setting"),
        ({"objective": "sft", "label_smoothing": 0.1}, "label_smoothing is a DPO setting"),
        ({"objective": "sft", "rpo_alpha": 1.0}, "rpo_alpha is a DPO setting"),
        ({"stages": ["sft", "reward_model"]}, "stages.1"),
        ({"stages": []}, "stages"),
        ({"stages": ["sft", "sft"]}, "stages: each objective at most once"),
        ({"stages": ["sft", "dpo"], "objective": "sft"}, "objective: give stages or objective"),
    ],
)
def test_invalid_training_requests_name_the_field(client, db, body, field):
    insert_pairs(db, 4)
    response = client.post("/train", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert jobs(db) == []


def test_a_missing_model_is_a_404_and_an_empty_dataset_a_409_naming_the_field(client, db):
    """What the server holds, not the request's form: a model that does not exist, no pairs to train."""
    insert_pairs(db, 4)
    for body, status, field in (
        ({"base_model": "train:99"}, 404, "base_model"),
        ({"dataset": {"constitution": "nobody"}}, 409, "dataset"),
    ):
        response = client.post("/train", json=body)
        assert response.status_code == status, response.text
        assert response.json()["errors"][0]["field"] == field
    assert jobs(db) == []


def test_metrics_as_json_and_csv(client, db):
    insert_pairs(db, 4)
    train_id = client.post("/train", json={}).json()["train_id"]
    with session_scope(db) as session:
        for step in (1, 2):
            training_queries.record_training_metrics(
                session, train_id, step, {"loss": 0.7 - step / 10, "rewards/accuracies": 0.5}
            )
    assert [m["step"] for m in client.get(f"/train/{train_id}/metrics").json()] == [1, 2]
    csv_text = client.get(f"/train/{train_id}/metrics", params={"format": "csv"}).text.splitlines()
    assert csv_text[0] == "step,loss,rewards/accuracies" and csv_text[1].startswith("1,0.6")
    assert client.get(f"/train/{train_id}").json()["latest_metrics"]["loss"] == pytest.approx(0.5)
    assert client.get("/train/999").status_code == 404


def test_policy_queues_exactly_one_job_under_concurrency(client, db):
    policy = {"min_new_pairs": 10, "params": {"max_steps": 2, "stages": ["sft", "dpo"]}}
    response = client.put("/train/policies/harmless", json=policy)
    assert response.status_code == 200, response.text
    insert_pairs(db, 9, flagged_extra=True)  # 9 unflagged: not yet
    with session_scope(db) as session:
        assert (
            policy_queries.queue_policy_training(session, "harmless", default_model="smollm2-135m-instruct")
            is None
        )
    insert_pairs(db, 3, flagged_extra=False)
    created = []
    barrier = threading.Barrier(6)

    def trigger():
        barrier.wait()
        with session_scope(db) as session:
            job = policy_queries.queue_policy_training(
                session, "harmless", default_model="smollm2-135m-instruct"
            )
            if job is not None:
                created.append(job.id)

    threads = [threading.Thread(target=trigger) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1
    (job,) = jobs(db)
    assert job.policy == "harmless" and job.params["max_steps"] == 2
    assert job.params["stages"] == ["sft", "dpo"]  # a policy's jobs run its stages
    assert job.dataset == {"constitution": "harmless", "policy_train_id": job.id}
    with session_scope(db) as session:
        taken = pair_queries.pair_ids(session, PairFilter(), taken_by_policy_job=job.id)
    assert len(taken) == 12  # every unflagged pair, none of the flagged one
    assert job.base_model == "smollm2-135m-instruct"
    # The same pairs never trigger a second job; new ones do once there are enough.
    with session_scope(db) as session:
        assert (
            policy_queries.queue_policy_training(session, "harmless", default_model="smollm2-135m-instruct")
            is None
        )
    policies = client.get("/train/policies").json()
    assert policies[0]["pairs_waiting"] == 0
    assert client.delete("/train/policies/harmless").status_code == 204
    assert client.get("/train/policies").json() == []


def test_policy_counts_a_pair_that_commits_after_a_later_one(client, db):
    """A long import holds a low pair id while workers commit higher ones: no pair is skipped."""
    client.put("/train/policies/harmless", json={"min_new_pairs": 3})
    with session_scope(db) as slow_import:
        slow_import.execute(
            Pair.__table__.insert(),
            {
                "constitution_name": "harmless",
                "prompt": [],
                "chosen": "c",
                "rejected": "r",
                "source": "import",
            },
        )
        insert_pairs(db, 3, flagged_extra=False)  # higher ids, committed first
        with session_scope(db) as other:
            first = policy_queries.queue_policy_training(other, "harmless", default_model="m")
    # The import has committed its lower id only now.
    assert client.get("/train/policies").json()[0]["pairs_waiting"] == 1
    insert_pairs(db, 2, flagged_extra=False)
    with session_scope(db) as other:
        second = policy_queries.queue_policy_training(other, "harmless", default_model="m")
    with session_scope(db) as other:
        sources = {
            job.id: sorted(
                p.source
                for p in pair_queries.pairs_by_ids(
                    other, pair_queries.pair_ids(other, PairFilter(), taken_by_policy_job=job.id)
                )
            )
            for job in (first, second)
        }
    assert sources == {first.id: ["test"] * 3, second.id: ["import", "test", "test"]}


def test_bad_policies(client):
    assert client.put("/train/policies/harmless", json={"min_new_pairs": 0}).status_code == 422
    assert (
        client.put("/train/policies/harmless", json={"min_new_pairs": 5, "params": {"beta": -1}})
        .json()["detail"]
        .startswith("params.beta")
    )
    assert client.put("/train/policies/Bad..Name", json={"min_new_pairs": 5}).status_code == 422
    staged = {"min_new_pairs": 5, "params": {"objective": "sft", "stages": ["sft", "dpo"]}}
    assert "give stages or objective" in client.put("/train/policies/harmless", json=staged).json()["detail"]


def test_worker_applies_policies_from_settings_once(settings, db):
    from workers.training.worker import TrainingWorker

    policies = '{"harmless": {"min_new_pairs": 5, "params": {"max_steps": 1, "lora": {"r": 4}}}}'
    worker = TrainingWorker(
        settings.model_copy(update={"train_policies": policies}), db, url=settings.database_url
    )
    asyncio.run(worker.sync_policies_from_settings())
    insert_pairs(db, 6, flagged_extra=False)
    asyncio.run(worker.queue_automatic_jobs())
    asyncio.run(worker.queue_automatic_jobs())
    (job,) = jobs(db)
    assert job.policy == "harmless" and job.params["lora"]["r"] == 4 and job.base_model == settings.model


def test_worker_outlives_a_database_outage(settings, db, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from workers.training.worker import TrainingWorker

    worker = TrainingWorker(settings.model_copy(update={"poll_seconds": 0.1}), db, url=settings.database_url)
    claims = []

    def claim(session, **kwargs):
        claims.append(kwargs["worker_id"])
        if len(claims) == 1:
            raise OperationalError("SELECT", {}, Exception("the database system is shutting down"))
        worker.stop()  # the second claim reached the database again: enough
        return None

    monkeypatch.setattr(training_queries, "claim_training_job", claim)
    asyncio.run(worker.run())
    assert len(claims) == 2
    with session_scope(db) as session:
        (row,) = session.scalars(select(Worker)).all()
        assert row.id == worker.id and row.stopped_at is not None


def test_step_metrics_survive_a_failed_write(client, settings, db, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from workers.training.worker import TrainingWorker

    insert_pairs(db, 4)
    train_id = client.post("/train", json={"max_steps": 3}).json()["train_id"]
    worker = TrainingWorker(settings, db, url=settings.database_url)
    with session_scope(db) as session:
        training_queries.claim_training_job(session, worker_id=worker.id, lease_seconds=60, max_attempts=3)
    real_write = training_queries.record_training_metrics

    def flaky_write(session, train_id, step, values):
        if step == 2 and not flaky_write.failed:
            flaky_write.failed = True
            raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
        real_write(session, train_id, step, values)

    flaky_write.failed = False
    monkeypatch.setattr(training_queries, "record_training_metrics", flaky_write)
    for step in (1, 2, 3):
        asyncio.run(worker.record_step(train_id, step, 3, {"loss": 0.7 - step / 100}))
    assert [m["step"] for m in client.get(f"/train/{train_id}/metrics").json()] == [1, 2, 3]
    assert client.get(f"/train/{train_id}").json()["step"] == 3
