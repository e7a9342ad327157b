"""The one queue (cai_dpo/core/queue.py) on a real PostgreSQL: claims, leases, attempts, release and
cancellation, run once per kind of leased work (prompts, training jobs); then what the prompt
queries add on top (the model filter, one pair per prompt)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select, update

from cai_dpo.core import queue
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.tables import GenerationJob, Pair, Prompt, TrainingJob
from tests.helpers import make_job, make_training_jobs, statuses

pytestmark = pytest.mark.db


def pair_values(job_id: int) -> dict:
    return {"job_id": job_id, "prompt": [], "chosen": "c", "rejected": "r", "flags": []}


@dataclass(frozen=True)
class Kind:
    """One kind of leased work as the tests drive it: how to queue rows, finish one, cancel all."""

    kind: queue.WorkKind
    make: Callable[[Any, Any, int], list[int]]  # (db, settings, n) -> ids of n queued rows
    complete: Callable[[Any, str, int], bool]  # (session, worker, id) -> finished by that worker?
    done: str  # the status of a finished row
    cancel_all: Callable[[Any], None] | None  # (session): nobody wants any row's work; None: never

    @property
    def table(self):
        return self.kind.table


def _make_prompts(db, settings, n: int) -> list[int]:
    job_id = make_job(db, settings, n)
    with session_scope(db) as session:
        return list(session.scalars(select(Prompt.id).where(Prompt.job_id == job_id).order_by(Prompt.id)))


def _complete_prompt(session, worker: str, prompt_id: int) -> bool:
    job_id = session.get(Prompt, prompt_id).job_id
    return job_queries.complete_prompt(
        session, worker_id=worker, prompt_id=prompt_id, pair=pair_values(job_id)
    )


def _complete_training(session, worker: str, train_id: int) -> bool:
    return training_queries.finish_training_job(session, train_id, worker_id=worker, status="succeeded")


def _make_evaluations(table, db, n: int) -> list[int]:
    """`n` evaluations of one (queued) training job's model."""
    (train_id,) = make_training_jobs(db, 1)
    with session_scope(db) as session:
        rows = [table(train_id=train_id, request={}) for _ in range(n)]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


# How each kind in `queue.KINDS` is driven, by its name: a kind added to the queue fails the tests
# below until it has an entry here.
KINDS = {
    "prompts": lambda work: Kind(
        work,
        make=_make_prompts,
        complete=_complete_prompt,
        done="done",
        cancel_all=lambda session: session.execute(update(GenerationJob).values(cancelled_at=func.now())),
    ),
    "training": lambda work: Kind(
        work,
        make=lambda db, settings, n: make_training_jobs(db, n),
        complete=_complete_training,
        done="succeeded",
        cancel_all=lambda session: session.execute(update(TrainingJob).values(cancel_requested=True)),
    ),
    "evaluations": lambda work: Kind(
        work,
        make=lambda db, settings, n: _make_evaluations(work.table, db, n),
        complete=lambda session, worker, id: queue.finish(
            session, work, worker_id=worker, id=id, status="done"
        ),
        done="done",
        cancel_all=None,  # an evaluation is not cancelled (its training job's deletion removes it)
    ),
}
PROMPTS = KINDS["prompts"](queue.PROMPTS)


@pytest.fixture(params=queue.KINDS, ids=lambda work: work.name)
def kind(request) -> Kind:
    work: queue.WorkKind = request.param
    assert work.name in KINDS, (
        f"queue kind {work.name!r}: say how to queue, finish and cancel its rows in KINDS"
    )
    return KINDS[work.name](work)


# The kinds whose rows can be cancelled (an evaluation cannot: its training job's deletion removes it).
CANCELLABLE = [w for w in queue.KINDS if w.name in KINDS and KINDS[w.name](w).cancel_all is not None]


@pytest.fixture(params=CANCELLABLE, ids=lambda work: work.name)
def cancellable(request) -> Kind:
    return KINDS[request.param.name](request.param)


def claim(db, kind: Kind, worker: str, n: int, *, lease: float = 60, max_attempts: int = 3) -> list[int]:
    with session_scope(db) as session:
        return queue.claim(
            session, kind.kind, worker_id=worker, n=n, lease_seconds=lease, max_attempts=max_attempts
        )


def rows(db, kind: Kind) -> dict[int, tuple[str, int, str | None]]:
    return statuses(db, kind.table)


def expire_leases(db, kind: Kind) -> None:
    t = kind.table
    with session_scope(db) as session:
        session.execute(update(t).where(t.status == "running").values(lease_expires_at=t.created_at))


# --- the queue, once per kind -------------------------------------------------------------------


def test_concurrent_claims_never_hand_a_row_to_two_workers(db, settings, kind):
    kind.make(db, settings, 200)
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        barrier.wait()
        mine = []
        while batch := claim(db, kind, name, 7):
            mine += batch
        claimed[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [row_id for ids in claimed.values() for row_id in ids]
    assert len(every) == len(set(every)) == 200
    assert sum(1 for ids in claimed.values() if ids) >= 2  # the work really was shared
    assert all(status == "running" and attempts == 1 for status, attempts, _ in rows(db, kind).values())
    # Each row's lease names the worker that got it.
    assert {row_id: owner for row_id, (_, _, owner) in rows(db, kind).items()} == {
        row_id: name for name, ids in claimed.items() for row_id in ids
    }


def test_expired_lease_makes_a_row_claimable_and_counts_attempts(db, settings, kind):
    kind.make(db, settings, 1)
    (first,) = claim(db, kind, "a", 1)
    assert claim(db, kind, "b", 1) == []  # leased
    expire_leases(db, kind)
    (second,) = claim(db, kind, "b", 1)
    assert second == first and rows(db, kind)[first][:2] == ("running", 2)
    with session_scope(db) as session:  # the first worker lost its lease: it cannot complete
        assert not kind.complete(session, "a", first)
    with session_scope(db) as session:
        assert kind.complete(session, "b", first)
    if kind.kind is queue.PROMPTS:
        with session_scope(db) as session:
            assert session.scalar(select(Pair.prompt_id)) == first
    assert rows(db, kind)[first] == (kind.done, 2, None)


def test_last_attempt_expiring_fails_the_row(db, settings, kind):
    kind.make(db, settings, 1)
    for _ in range(2):
        claim(db, kind, "w", 1, max_attempts=2)
        expire_leases(db, kind)
    assert claim(db, kind, "w", 1, max_attempts=2) == []
    with session_scope(db) as session:
        row = session.scalars(select(kind.table)).one()
        assert row.status == "failed" and "lease expired on attempt 2" in row.last_error
        assert row.lease_owner is None and row.finished_at is not None


def test_fail_retries_until_attempts_run_out_and_not_when_not_retryable(db, settings, kind):
    kind.make(db, settings, 2)
    a, b = claim(db, kind, "w", 2, max_attempts=2)
    with session_scope(db) as session:
        assert (
            queue.fail(session, kind.kind, worker_id="w", id=a, error="boom", retryable=True, max_attempts=2)
            == "queued"
        )
        assert (
            queue.fail(
                session,
                kind.kind,
                worker_id="w",
                id=b,
                error="prompt too long",
                retryable=False,
                max_attempts=2,
            )
            == "failed"
        )
        # Only the lease holder can fail a row: a row it no longer holds is not touched.
        assert (
            queue.fail(session, kind.kind, worker_id="w", id=a, error="late", retryable=True, max_attempts=2)
            is None
        )
    (again,) = claim(db, kind, "w", 2, max_attempts=2)
    assert again == a and rows(db, kind)[a][:2] == ("running", 2)
    with session_scope(db) as session:
        assert (
            queue.fail(session, kind.kind, worker_id="w", id=a, error="boom", retryable=True, max_attempts=2)
            == "failed"
        )
    assert {s for s, _, _ in rows(db, kind).values()} == {"failed"}
    with session_scope(db) as session:
        errors = dict(session.execute(select(kind.table.id, kind.table.last_error)).all())
    assert errors == {a: "boom", b: "prompt too long"}


def test_release_gives_rows_back_at_once_without_counting_the_attempt(db, settings, kind):
    kind.make(db, settings, 3)
    held = claim(db, kind, "w", 3)
    with session_scope(db) as session:
        assert queue.release(session, kind.kind, worker_id="other", ids=held) == 0  # not its rows
        assert queue.release(session, kind.kind, worker_id="w", ids=held) == 3
    assert all(v == ("queued", 0, None) for v in rows(db, kind).values())
    assert len(claim(db, kind, "other", 3)) == 3


def test_lease_renewal_reports_what_is_still_held(db, settings, kind):
    kind.make(db, settings, 2)
    a, b = claim(db, kind, "w", 2)
    expire_leases(db, kind)
    assert claim(db, kind, "thief", 1) == [a]  # takes `a`, the lowest id
    with session_scope(db) as session:
        held = queue.renew(session, kind.kind, worker_id="w", ids=[a, b], lease_seconds=60)
    assert held == {b}
    with session_scope(db) as session:  # the renewal moved b's lease forward again
        lease = session.get(kind.table, b).lease_expires_at
        assert lease > session.scalar(select(func.now()))


def test_cancelled_rows_end_cancelled_when_unheld(db, settings, cancellable):
    kind = cancellable
    ids = kind.make(db, settings, 3)
    (held,) = claim(db, kind, "w", 1)
    assert held == ids[0]
    with session_scope(db) as session:
        kind.cancel_all(session)
    assert claim(db, kind, "other", 3) == []  # cancelled work is never handed out
    status = rows(db, kind)
    assert status[ids[1]][0] == status[ids[2]][0] == "cancelled"  # queued: settled at once
    assert status[held] == ("running", 1, "w")  # held: its holder still has it
    with session_scope(db) as session:
        still_held = queue.renew(session, kind.kind, worker_id="w", ids=[held], lease_seconds=60)
    # A training run stops at once when cancelled; a prompt already running is cheap to finish.
    assert still_held == (set() if kind.kind.stop_when_cancelled else {held})
    expire_leases(db, kind)  # its holder died (or stopped) without finishing
    assert claim(db, kind, "other", 3) == []
    assert rows(db, kind)[held] == ("cancelled", 1, None)


# --- what the prompt queries add ------------------------------------------------------------------


def test_claim_prompts_filters_by_model_and_skips_cancelled_jobs(db, settings):
    make_job(db, settings, 2, model="train:1")
    cancelled = make_job(db, settings, 2)
    with session_scope(db) as session:
        job_queries.cancel_job(session, cancelled)
        assert job_queries.claimable_models(session, max_attempts=3) == ["train:1"]
    with session_scope(db) as session:
        assert (
            job_queries.claim_prompts(
                session, worker_id="w", model="smollm2-135m-instruct", n=10, lease_seconds=60, max_attempts=3
            )
            == []
        )
    with session_scope(db) as session:
        claimed = job_queries.claim_prompts(
            session, worker_id="w", model="train:1", n=10, lease_seconds=60, max_attempts=3
        )
        assert len(claimed) == 2 and all(p.model == "train:1" and p.attempts == 1 for p in claimed)


def test_a_prompt_never_gets_two_pairs(db, settings):
    job_id = make_job(db, settings, 1)
    (prompt_id,) = claim(db, PROMPTS, "w", 1)
    with session_scope(db) as session:
        assert job_queries.complete_prompt(
            session, worker_id="w", prompt_id=prompt_id, pair=pair_values(job_id)
        )
    with session_scope(db) as session:  # a second completion (e.g. a replayed message) writes nothing
        assert not job_queries.complete_prompt(
            session, worker_id="w", prompt_id=prompt_id, pair=pair_values(job_id)
        )
    with session_scope(db) as session:
        assert len(session.scalars(select(Pair)).all()) == 1
