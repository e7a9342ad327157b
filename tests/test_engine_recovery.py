"""A generation worker that outlives its engine: a dead engine costs no prompt an attempt, the
worker says so in its heartbeat (`/workers`, `/health`), restarts the engine, and exits non-zero
when it cannot. Also the lease keeper's bookkeeping that the code review found wrong.

A scripted engine stands in for vLLM here (bookkeeping only); the same failure on the real
engine, its process killed mid-job, is in test_generation_e2e.py.
"""

import asyncio

import pytest
from sqlalchemy import select, update

from cai_dpo.core import queue
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import workers as worker_queries
from cai_dpo.core.tables import Pair, Prompt, Worker
from tests.fake_engine import ScriptedEngine
from tests.helpers import make_job, run_until, statuses
from workers.generation.engines import EngineError, EngineUnavailable
from workers.generation.worker import EngineRestartsExhausted, GenerationWorker
from workers.runtime import LeaseKeeper

pytestmark = pytest.mark.db


class DyingEngine(ScriptedEngine):
    """Answers `healthy_calls` chats, then fails every one with `error` until it is restarted
    (a restart fails unless `recovers`)."""

    def __init__(self, healthy_calls: int, error: Exception, *, recovers: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.healthy_calls = healthy_calls
        self.error = error
        self.recovers = recovers
        self.starts = 0
        self.dead = False
        self.problems_seen: list[str | None] = []

    async def start(self) -> None:
        if self.dead and not self.recovers:
            raise RuntimeError("the engine does not come back")
        self.starts += 1
        self.dead = False
        await super().start()

    async def chat(self, messages, sampling, request_id):
        if self.dead or (self.starts == 1 and len(self.calls) >= self.healthy_calls):
            self.dead = True
            self.calls.append((request_id, messages))
            raise self.error
        return await super().chat(messages, sampling, request_id)


def make_worker(settings, db, engine, **overrides) -> GenerationWorker:
    settings = settings.model_copy(
        update={"max_in_flight": 4, "claim_batch": 4, "poll_seconds": 0.1, "lease_seconds": 3} | overrides
    )
    worker = GenerationWorker(settings, db, url=settings.database_url, engine_factory=lambda *_: engine)
    # The back-off between failed restarts (2 s, 4 s, ...) proves nothing here: these tests count
    # restarts and attempts, not seconds.
    worker.restart_delay = lambda attempt: 0.01
    return worker


def all_done(db):
    return lambda: all(status == "done" for status, _, _ in statuses(db).values())


def test_a_dead_engine_costs_no_attempt_and_is_restarted(settings, db):
    make_job(db, settings, 8)
    engine = DyingEngine(healthy_calls=5, error=EngineUnavailable("vLLM engine dead: EngineDeadError()"))
    worker = make_worker(settings, db, engine)
    problems = []
    report = worker.report

    async def watched_report():  # every health change is reported at once
        problems.append(worker.problem)
        await report()

    worker.report = watched_report
    run_until(worker, all_done(db), timeout=40)
    assert engine.starts == 2  # the first start, then one restart
    assert problems[0].startswith("engine down: vLLM engine dead") and problems[-1] is None
    with session_scope(db) as session:
        prompts = session.scalars(select(Prompt)).all()
        assert all(p.status == "done" for p in prompts)
        # Released, not failed: no prompt paid for the engine's death (one claim each, at most
        # one more for those that were in flight when it died and were claimed again).
        assert all(p.last_error is None for p in prompts)
        assert max(p.attempts for p in prompts) == 1
        assert len(session.scalars(select(Pair)).all()) == 8


def test_many_engine_errors_in_a_row_count_as_a_dead_engine(settings, db):
    make_job(db, settings, 6)
    engine = DyingEngine(healthy_calls=0, error=EngineError("request failed: connection reset"))
    worker = make_worker(
        settings, db, engine, engine_error_limit=3, engine_restarts=1, max_in_flight=1, claim_batch=1
    )
    # The engine never answers: after 3 errors in a row the worker stops blaming prompts.
    engine.recovers = False
    with pytest.raises(EngineRestartsExhausted):
        run_until(worker, lambda: False, timeout=40)
    rows = statuses(db)
    assert all(status == "queued" for status, _, _ in rows.values())
    # Two attempts were charged before the third error in a row showed the engine was the cause.
    assert sum(attempts for _, attempts, _ in rows.values()) == 2


def test_an_engine_that_cannot_restart_makes_the_worker_exit_with_its_prompts_released(settings, db):
    make_job(db, settings, 4)
    engine = DyingEngine(healthy_calls=0, error=EngineUnavailable("gone"), recovers=False)
    worker = make_worker(settings, db, engine, engine_restarts=2)
    with pytest.raises(EngineRestartsExhausted, match="engine down: gone"):
        run_until(worker, lambda: False, timeout=40)
    assert all(v == ("queued", 0, None) for v in statuses(db).values())
    with session_scope(db) as session:
        row = session.scalars(select(Worker)).one()
        assert row.stopped_at is not None and row.stats["problem"] == "engine down: gone"


def test_health_says_degraded_with_the_reason_only_to_callers_with_a_key(client, settings, db):
    with session_scope(db) as session:
        worker_queries.record_worker_heartbeat(
            session,
            id="gen-1",
            kind="generate",
            host="h",
            pid=1,
            model="m",
            in_flight=0,
            tokens_per_s=0.0,
            stats={"problem": "engine down: EngineDeadError"},
        )
    body = client.get("/health").json()  # loopback mode: every caller is trusted
    assert body["status"] == "degraded" and body["unhealthy_workers"] == 1
    assert body["problems"] == [
        {"worker": "gen-1", "kind": "generate", "problem": "engine down: EngineDeadError"}
    ]
    (worker,) = client.get("/workers").json()
    assert worker["healthy"] is False and worker["problem"].startswith("engine down")
    assert 'cai_worker_healthy{kind="generate",worker="gen-1"} 0.0' in client.get("/metrics").text


def test_lease_keeper_never_loses_a_row_claimed_during_a_renewal(settings, db):
    make_job(db, settings, 2)
    lost = []
    keeper = LeaseKeeper(queue.PROMPTS, "w", 60, lambda row, token: lost.append(row))
    with session_scope(db) as session:
        first, second = job_queries.claim_prompts(
            session, worker_id="w", model="smollm2-135m-instruct", n=2, lease_seconds=60, max_attempts=3
        )
    keeper.hold(first.id, "task-1")
    snapshot = dict(keeper.held)  # the renewal is sent with this...
    keeper.hold(second.id, "task-2")  # ...while this prompt is claimed
    with session_scope(db) as session:
        still_held = keeper.renew(session, snapshot)
    keeper.settle(snapshot, still_held)
    assert lost == [] and set(keeper.held) == {first.id, second.id}


def test_lease_keeper_reports_a_lost_row_once_and_not_after_it_was_claimed_again(settings, db):
    make_job(db, settings, 1)
    lost = []
    keeper = LeaseKeeper(queue.PROMPTS, "w", 60, lambda row, token: lost.append((row, token)))
    keeper.hold(1, "old-task")
    snapshot = dict(keeper.held)
    keeper.hold(1, "new-task")  # the same worker claimed it again meanwhile
    keeper.settle(snapshot, still_held=set())
    assert lost == [] and keeper.held == {1: "new-task"}
    snapshot = dict(keeper.held)
    keeper.settle(snapshot, still_held=set())
    keeper.settle(snapshot, still_held=set())
    assert lost == [(1, "new-task")] and keeper.held == {}


def test_a_prompt_claimed_again_by_the_same_worker_stops_its_old_trajectory(settings, db):
    make_job(db, settings, 1)
    engine = ScriptedEngine()
    engine.gate.clear()  # trajectories wait until released
    worker = make_worker(settings, db, engine)

    async def main():
        with session_scope(db) as session:
            (prompt,) = job_queries.claim_prompts(
                session,
                worker_id=worker.id,
                model="smollm2-135m-instruct",
                n=1,
                lease_seconds=60,
                max_attempts=3,
            )
        worker.engine = engine
        worker.start_trajectory(prompt)
        old = worker.in_flight[prompt.id]
        await asyncio.sleep(0.05)
        worker.start_trajectory(prompt)  # its lease ran out and this worker claimed it again
        new = worker.in_flight[prompt.id]
        await asyncio.sleep(0.05)
        assert old.cancelled() and not new.done()
        new.cancel()
        await asyncio.gather(new, return_exceptions=True)

    asyncio.run(main())


def test_claimable_models_sees_prompts_whose_lease_ran_out(settings, db):
    make_job(db, settings, 1, model="train:7")
    with session_scope(db) as session:
        job_queries.claim_prompts(
            session, worker_id="gone", model="train:7", n=1, lease_seconds=60, max_attempts=3
        )
    with session_scope(db) as session:
        assert job_queries.claimable_models(session, max_attempts=3) == []  # held
        session.execute(update(Prompt).values(lease_expires_at=Prompt.created_at))  # its worker died
    with session_scope(db) as session:
        assert job_queries.claimable_models(session, max_attempts=3) == ["train:7"]
