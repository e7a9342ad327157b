"""The generation worker's bookkeeping with a scripted engine and a real PostgreSQL.

The real-engine end-to-end tests live in test_generation_e2e.py; these check what the worker
does around the engine: pairs written once, failures recorded alone, stop releases prompts.
"""

import asyncio
import contextlib

import psycopg
import pytest
from sqlalchemy import select

from cai_dpo.core.db import libpq_url, session_scope
from cai_dpo.core.tables import Pair, Prompt, Worker
from tests.fake_engine import ScriptedEngine
from tests.helpers import make_job, run_until, statuses, with_database
from workers.generation.engines import EngineStats
from workers.generation.in_flight import waiting_margin
from workers.generation.worker import GenerationWorker

pytestmark = pytest.mark.db


def make_worker(settings, db, engine: ScriptedEngine, **overrides) -> GenerationWorker:
    settings = settings.model_copy(update={"max_in_flight": 4, "claim_batch": 2, **overrides})
    return GenerationWorker(settings, db, url=settings.database_url, engine_factory=lambda *_: engine)


def all_finished(db):
    return lambda: all(s in ("done", "failed") for s, _, _ in statuses(db).values())


def test_worker_writes_one_pair_per_prompt_with_its_trajectory(settings, db):
    job_id = make_job(db, settings, 10)
    engine = ScriptedEngine(reply=lambda m: f"reply to {m[-1]['content'][:20]} #{len(m)}")
    worker = make_worker(settings, db, engine)
    run_until(worker, all_finished(db))
    with session_scope(db) as session:
        pairs = session.scalars(select(Pair).order_by(Pair.prompt_id)).all()
        assert len(pairs) == 10 and {p.job_id for p in pairs} == {job_id}
        for pair in pairs:
            assert pair.rejected.startswith("reply to prompt")
            assert len(pair.trajectory["rounds"]) == 1 and pair.trajectory["principles"][0]
            assert pair.chosen == pair.trajectory["rounds"][0]["revision"]
            assert pair.usage["completion_tokens"] > 0 and pair.flags == []
        workers = session.scalars(select(Worker)).all()
        assert len(workers) == 1 and workers[0].stopped_at is not None
    assert worker.pairs_written == 10


def test_a_prompt_too_long_fails_alone_with_its_reason(settings, db):
    make_job(db, settings, 3)
    with session_scope(db) as session:
        session.scalars(select(Prompt).where(Prompt.position == 1)).one().messages = [
            {"role": "user", "content": "TOO LONG " * 10}
        ]
    worker = make_worker(settings, db, ScriptedEngine())
    run_until(worker, all_finished(db))
    with session_scope(db) as session:
        prompts = {p.position: p for p in session.scalars(select(Prompt))}
        assert prompts[1].status == "failed" and "prompt too long" in prompts[1].last_error
        assert prompts[1].attempts == 1  # not retried: it can never fit
        assert prompts[0].status == prompts[2].status == "done"


def test_unchanged_revision_is_flagged(settings, db):
    make_job(db, settings, 2)
    worker = make_worker(settings, db, ScriptedEngine(reply=lambda m: "the same words"))
    run_until(worker, all_finished(db))
    with session_scope(db) as session:
        assert {tuple(p.flags) for p in session.scalars(select(Pair))} == {("unchanged",)}


def test_stop_releases_prompts_in_flight_at_once(settings, db):
    make_job(db, settings, 6)
    engine = ScriptedEngine()
    engine.gate.clear()  # every chat blocks: the trajectories stay in flight
    worker = make_worker(settings, db, engine)
    run_until(worker, lambda: sum(s == "running" for s, _, _ in statuses(db).values()) == 4)
    assert all(v == ("queued", 0, None) for v in statuses(db).values())
    with session_scope(db) as session:
        assert session.scalars(select(Pair)).all() == []


def test_a_nul_character_from_the_model_does_not_stop_the_pair_being_saved(settings, db):
    make_job(db, settings, 2)
    worker = make_worker(settings, db, ScriptedEngine(reply=lambda m: f"odd\x00 byte #{len(m)}"))
    run_until(worker, all_finished(db))
    with session_scope(db) as session:
        assert [p.status for p in session.scalars(select(Prompt))] == ["done", "done"]
        pairs = session.scalars(select(Pair)).all()
        assert len(pairs) == 2 and all(p.rejected.startswith("odd byte #") for p in pairs)
        assert all("\x00" not in p.chosen for p in pairs)


@contextlib.contextmanager
def database_outage(settings):
    """The worker's database out of reach: new connections refused, every open one cut (as a
    restart or a failover does), until the block ends. Works on the embedded server and on a
    `DATABASE_URL` one alike."""
    url = libpq_url(settings.database_url)
    with psycopg.connect(url) as conn:
        name = conn.info.dbname
    with psycopg.connect(with_database(url, "template1"), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_a_database_outage_costs_no_prompt_an_attempt(settings, db):
    """Pairs finished while the database is down are written when it is back: no prompt failed,
    retried or duplicated (an infrastructure failure is never the prompt's fault)."""
    make_job(db, settings, 8)
    engine = ScriptedEngine()
    engine.gate.clear()
    worker = make_worker(settings, db, engine)
    outage = database_outage(settings)

    async def main():
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(60):
                while sum(s == "running" for s, _, _ in (await asyncio.to_thread(statuses, db)).values()) < 4:
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(outage.__enter__)
                engine.gate.set()  # the trajectories finish and their writes meet the outage
                while not worker.database_lost:
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(outage.__exit__, None, None, None)
                while not await asyncio.to_thread(all_finished(db)):
                    await asyncio.sleep(0.05)
        finally:
            worker.stopping.set()
            await task

    asyncio.run(main())
    assert set(statuses(db).values()) == {("done", 1, None)}  # one attempt each, none failed
    with session_scope(db) as session:
        assert sorted(p.prompt_id for p in session.scalars(select(Pair))) == sorted(statuses(db))
    assert worker.exit_code == 0


def test_a_database_gone_for_good_ends_the_worker_without_failing_prompts(settings, db):
    """Past CAI_DB_OUTAGE_SECONDS the worker exits non-zero for its supervisor; the prompts it held
    keep their attempt count and come back when their leases run out."""
    make_job(db, settings, 4)
    engine = ScriptedEngine()
    engine.gate.clear()
    worker = make_worker(settings, db, engine, db_outage_seconds=1.0)

    async def main():
        task = asyncio.create_task(worker.run())
        async with asyncio.timeout(60):
            while sum(s == "running" for s, _, _ in (await asyncio.to_thread(statuses, db)).values()) < 4:
                await asyncio.sleep(0.05)
            with database_outage(settings):
                engine.gate.set()
                await task  # ends on its own: the database did not come back in time

    asyncio.run(main())
    assert worker.exit_code == 4 and not engine.started  # the engine was shut down
    assert {status for status, attempts, _ in statuses(db).values()} == {"running"}
    assert {attempts for _, attempts, _ in statuses(db).values()} == {1}
    with session_scope(db) as session:
        assert session.scalars(select(Pair)).all() == []


class BatchingEngine(ScriptedEngine):
    """A GPU-like engine that batches `max_num_seqs` requests and queues the rest, and says so."""

    on_cpu = False

    def __init__(self, max_num_seqs: int) -> None:
        super().__init__()
        self.max_num_seqs = max_num_seqs
        self.asked = 0

    async def chat(self, messages, sampling, request_id):
        self.asked += 1
        try:
            return await super().chat(messages, sampling, request_id)
        finally:
            self.asked -= 1

    def stats(self) -> EngineStats:
        running = min(self.asked, self.max_num_seqs)
        return EngineStats(
            requests=len(self.calls),
            running=running,
            waiting=self.asked - running,
            kv_cache_usage=0.5,
            max_num_seqs=self.max_num_seqs,
        )


def test_in_flight_is_sized_to_an_engine_that_reports_its_batch(client, settings, db):
    """Unset CAI_MAX_IN_FLIGHT and an engine that batches 32: the worker holds its batch plus a
    short queue (not the fixed 64 of an engine that says nothing), and /workers and /metrics show
    the engine's occupancy as the worker read it."""
    make_job(db, settings, 120)
    engine = BatchingEngine(max_num_seqs=32)
    engine.gate.clear()  # every request waits: the engine is as full as the worker makes it
    worker = make_worker(
        settings, db, engine, max_in_flight=None, claim_batch=256, lease_seconds=3, poll_seconds=0.1
    )

    seen = {}

    def engine_seen() -> bool:
        workers = [w for w in client.get("/workers").json() if w["id"] == worker.id]
        margin = waiting_margin(32)
        if workers and (workers[0]["engine"] or {}) | {"kv_cache_usage": 0} == {
            "in_flight_target": 32 + margin,
            "running": 32,
            "waiting": margin,
            "kv_cache_usage": 0,
            "max_num_seqs": 32,
        }:
            seen["worker"], seen["metrics"] = workers[0], client.get("/metrics").text
            seen["target"], seen["asked"] = worker.in_flight_target(), engine.asked
        return bool(seen)

    run_until(worker, engine_seen)
    margin = waiting_margin(32)
    assert seen["target"] == 32 + margin and seen["asked"] == 32 + margin
    assert seen["worker"]["engine"] == {
        "in_flight_target": 32 + margin,
        "running": 32,
        "waiting": margin,
        "kv_cache_usage": 0.5,
        "max_num_seqs": 32,
    }
    assert f'cai_engine_waiting{{kind="generate",worker="{worker.id}"}} {float(margin)}' in seen["metrics"]
