"""A job's usage (tokens, engine seconds, cost) and its budget of generated tokens, over HTTP with
a scripted engine and a real PostgreSQL."""

import re

import pytest
from sqlalchemy import select

from cai_dpo.core import queue
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.tables import GenerationJob, Pair, Prompt
from tests.fake_engine import ScriptedEngine
from tests.helpers import make_job, pairs_of, run_until
from workers.generation.in_flight import SharedEngineTime
from workers.generation.worker import GenerationWorker

FIVE_WORDS = "one two three four five"  # the scripted engine counts a word as a token
PAIR_TOKENS = 3 * 5  # revise, one round: the answer, the critique and the revision


@pytest.fixture
def settings(settings, request):
    """The suite's settings, with this test's overrides (`indirect` parametrization)."""
    return settings.model_copy(update=getattr(request, "param", {}))


def one_at_a_time_worker(settings, db) -> GenerationWorker:
    """A worker that holds one prompt at a time: its next claim follows the previous commit, so
    the prompt whose pair reaches a budget is the last one it makes."""
    settings = settings.model_copy(update={"max_in_flight": 1, "claim_batch": 1})
    engine = ScriptedEngine(reply=lambda messages: FIVE_WORDS)
    return GenerationWorker(settings, db, url=settings.database_url, engine_factory=lambda *_: engine)


def submit(client, n: int, **fields) -> int:
    prompts = [f"question {i}" for i in range(n)]
    body = {"prompts": prompts, "constitution": "harmless", "revisions": 1, **fields}
    response = client.post("/generate", json=body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def job_over(client, job_id: int):
    return lambda: client.get(f"/jobs/{job_id}").json()["status"] in ("done", "failed", "cancelled")


@pytest.mark.db
def test_the_budget_cancels_the_unclaimed_prompts_and_the_job_says_why(client, settings, db):
    job_id = submit(client, 12, max_generated_tokens=2 * PAIR_TOKENS)
    run_until(one_at_a_time_worker(settings, db), job_over(client, job_id))

    job = client.get(f"/jobs/{job_id}").json()
    reason = f"budget: max_generated_tokens {2 * PAIR_TOKENS} reached"
    assert job["status"] == "cancelled" and job["stop_reason"] == reason
    # The second pair reached it; the worker held no other prompt, so no third was made.
    assert job["counts"] | {"flagged": 0} == {
        "queued": 0,
        "running": 0,
        "done": 2,
        "failed": 0,
        "cancelled": 10,
        "flagged": 0,
    }
    assert job["usage"] | {"engine_seconds": 0} == {
        "generated_tokens": 2 * PAIR_TOKENS,
        "prompt_tokens": 2 * 3 * 10,  # 10 prompt tokens per scripted request
        "engine_seconds": 0,
        "cost": None,  # CAI_GPU_HOUR_COST is not set
        "max_generated_tokens": 2 * PAIR_TOKENS,
        "budget_reached": True,
    }
    cancelled = client.get(f"/jobs/{job_id}/prompts", params={"status": "cancelled"}).json()["items"]
    assert len(cancelled) == 10 and {p["last_error"] for p in cancelled} == {reason}
    assert {p["attempts"] for p in cancelled} == {0}
    # A cancelled prompt is nobody's work any more: the queue offers none of them again.
    with session_scope(db) as session:
        claimed = job_queries.claim_prompts(
            session, worker_id="other", model=settings.model, n=100, lease_seconds=30, max_attempts=3
        )
    assert claimed == []
    assert client.get("/jobs").json()[0]["usage"] == job["usage"]
    page = client.get(f"/ui/jobs/{job_id}").text
    assert f'<p class="error-text" id="stop-reason">Stopped: {reason}</p>' in page
    assert f"{2 * PAIR_TOKENS} tokens generated · {2 * 3 * 10} prompt tokens" in page
    assert f'<dd id="budget">{2 * PAIR_TOKENS} generated tokens: reached</dd>' in page
    assert "cost" not in usage_shown(page)


def usage_shown(page: str) -> str:
    """The console job page's usage line."""
    return re.search(r'<dd id="usage">(.*?)</dd>', page, re.S).group(1)


@pytest.mark.db
def test_the_usage_is_the_sum_of_the_pairs_usage(client, settings, db):
    job_id = submit(client, 5)
    run_until(one_at_a_time_worker(settings, db), job_over(client, job_id))

    job = client.get(f"/jobs/{job_id}").json()
    pairs = pairs_of(db, job_id)
    assert job["status"] == "done" and len(pairs) == 5 and job["stop_reason"] is None
    usage = job["usage"]
    assert usage["generated_tokens"] == sum(p.usage["completion_tokens"] for p in pairs) == 5 * PAIR_TOKENS
    assert usage["prompt_tokens"] == sum(p.usage["prompt_tokens"] for p in pairs) == 5 * 3 * 10
    engine_seconds = sum(p.usage["engine_seconds"] for p in pairs)
    assert engine_seconds > 0 and usage["engine_seconds"] == round(engine_seconds, 3)
    assert usage["max_generated_tokens"] is None and usage["budget_reached"] is False


@pytest.mark.db
@pytest.mark.parametrize("settings", [{"gpu_hour_cost": 2.5}], indirect=True)
def test_the_cost_is_engine_hours_at_the_configured_price(client, settings, db):
    job_id = submit(client, 2)
    run_until(one_at_a_time_worker(settings, db), job_over(client, job_id))

    usage = client.get(f"/jobs/{job_id}").json()["usage"]
    with session_scope(db) as session:
        seconds = session.get(GenerationJob, job_id).engine_seconds
    assert seconds > 0 and usage["cost"] == pytest.approx(seconds / 3600 * 2.5)
    assert client.get("/jobs").json()[0]["usage"]["cost"] == usage["cost"]
    shown = re.search(r"cost (\S+)", usage_shown(client.get(f"/ui/jobs/{job_id}").text))
    assert float(shown.group(1)) == pytest.approx(usage["cost"], rel=1e-3)


@pytest.mark.db
@pytest.mark.parametrize("value", [0, -5, "many", 1.5, 2**63, None, True])
def test_a_bad_max_generated_tokens_is_a_422_naming_it(client, db, value):
    body = {"prompts": ["hi"], "constitution": "harmless", "max_generated_tokens": value}
    if value is None:  # null is "no budget"
        assert client.post("/generate", json=body).status_code == 202
        return
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("max_generated_tokens:"), response.json()
    with session_scope(db) as session:
        assert session.scalars(select(GenerationJob)).all() == []


@pytest.mark.db
def test_a_prompt_given_back_after_the_budget_is_cancelled_saying_why(settings, db):
    """A worker that stops gives its running prompts back (`queue.release`); once the job's budget
    is reached, settling them ends them `cancelled` with the budget's reason, not queued again."""
    job_id = make_job(db, settings, 3)
    with session_scope(db) as session:
        session.get(GenerationJob, job_id).max_generated_tokens = 10
    with session_scope(db) as session:
        first, second = job_queries.claim_prompts(
            session, worker_id="w1", model=settings.model, n=2, lease_seconds=30, max_attempts=3
        )
    pair = {
        "job_id": job_id,
        "prompt": first.messages,
        "chosen": "c",
        "rejected": "r",
        "usage": {"completion_tokens": 12, "prompt_tokens": 4, "engine_seconds": 0.5},
    }
    with session_scope(db) as session:
        assert job_queries.complete_prompts(session, Pair, worker_id="w1", results={first.id: pair})
    with session_scope(db) as session:
        queue.release(session, queue.PROMPTS, worker_id="w1", ids=[second.id])
        queue.expire(session, queue.PROMPTS, max_attempts=3)
    with session_scope(db) as session:
        prompts = {p.id: p for p in session.scalars(select(Prompt).where(Prompt.job_id == job_id))}
        job = session.get(GenerationJob, job_id)
        assert (job.generated_tokens, job.prompt_tokens, job.engine_seconds) == (12, 4, 0.5)
        assert job.stop_reason == "budget: max_generated_tokens 10 reached"
        assert prompts[first.id].status == "done"
        others = [p for p in prompts.values() if p.id != first.id]
        assert [(p.status, p.last_error) for p in others] == [("cancelled", job.stop_reason)] * 2


@pytest.mark.db
def test_a_job_cancelled_by_its_caller_gets_no_budget_reason(client, settings, db):
    job_id = make_job(db, settings, 3)
    with session_scope(db) as session:
        session.get(GenerationJob, job_id).max_generated_tokens = 1
        first = job_queries.claim_prompts(
            session, worker_id="w1", model=settings.model, n=1, lease_seconds=30, max_attempts=3
        )[0]
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    pair = {"job_id": job_id, "prompt": first.messages, "chosen": "c", "rejected": "r"}
    pair["usage"] = {"completion_tokens": 5, "prompt_tokens": 1}
    with session_scope(db) as session:
        job_queries.complete_prompts(session, Pair, worker_id="w1", results={first.id: pair})
    job = client.get(f"/jobs/{job_id}").json()
    assert job["stop_reason"] is None and job["usage"]["budget_reached"] is True
    prompts = client.get(f"/jobs/{job_id}/prompts", params={"status": "cancelled"}).json()["items"]
    assert len(prompts) == 2 and {p["last_error"] for p in prompts} == {None}


@pytest.mark.unit
def test_engine_time_is_shared_among_the_trajectories_in_flight():
    now = [0.0]
    shared = SharedEngineTime(clock=lambda: now[0])
    a = shared.start()
    now[0] = 2.0  # a alone: 2 s
    b = shared.start()
    now[0] = 6.0  # a and b: 2 s each
    assert a.stop() == pytest.approx(4.0)
    assert a.stop() == pytest.approx(4.0)  # stopping again changes nothing
    now[0] = 7.0  # b alone: 1 s
    assert b.stop() == pytest.approx(3.0)
    now[0] = 9.0  # nobody in flight: the engine was idle
    c = shared.start()
    now[0] = 10.0
    assert c.stop() == pytest.approx(1.0)
    # The shares add up to the time the engine had work (0-7 s and 9-10 s).
    assert a.seconds + b.seconds + c.seconds == pytest.approx(8.0)
