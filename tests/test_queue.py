"""The prompt queue on a real PostgreSQL: claims, leases, attempts, completion and release."""

import threading

from sqlalchemy import select, update

from cai_dpo.core import queue
from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.tables import Pair, Prompt


def make_job(db, settings, n: int, model: str = "smollm2-135m-instruct") -> int:
    constitution = ConstitutionStore(settings.constitutions_dir).get("harmless")
    with session_scope(db) as session:
        version = constitution_queries.store_constitution_version(session, constitution)
        job = job_queries.create_generation_job(
            session,
            constitution_version=version,
            model=model,
            revisions=1,
            sampling={"temperature": 0.7, "top_p": 0.95, "max_tokens": 32, "seed": None},
            metadata={},
            prompts=[[{"role": "user", "content": f"prompt {i}"}] for i in range(n)],
            idempotency_key=None,
            request_hash=None,
        )
        return job.id


def claim(
    db, worker: str, n: int, *, lease: float = 60, model: str = "smollm2-135m-instruct", max_attempts: int = 3
):
    with session_scope(db) as session:
        return job_queries.claim_prompts(
            session, worker_id=worker, model=model, n=n, lease_seconds=lease, max_attempts=max_attempts
        )


def statuses(db) -> dict[int, tuple[str, int, str | None]]:
    with session_scope(db) as session:
        return {p.id: (p.status, p.attempts, p.lease_owner) for p in session.scalars(select(Prompt))}


def expire_leases(db) -> None:
    with session_scope(db) as session:
        session.execute(
            update(Prompt).where(Prompt.status == "running").values(lease_expires_at=Prompt.created_at)
        )


def pair_values(job_id: int) -> dict:
    return {"job_id": job_id, "prompt": [], "chosen": "c", "rejected": "r", "flags": []}


def test_concurrent_claims_never_hand_a_prompt_to_two_workers(db, settings):
    make_job(db, settings, 200)
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        barrier.wait()
        mine = []
        while batch := claim(db, name, 7):
            mine += [p.id for p in batch]
        claimed[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [pid for ids in claimed.values() for pid in ids]
    assert len(every) == len(set(every)) == 200
    assert sum(1 for ids in claimed.values() if ids) >= 2  # the work really was shared
    assert all(status == "running" and attempts == 1 for status, attempts, _ in statuses(db).values())


def test_claim_filters_by_model_and_skips_cancelled_jobs(db, settings):
    make_job(db, settings, 2, model="train:1")
    cancelled = make_job(db, settings, 2)
    with session_scope(db) as session:
        job_queries.cancel_job(session, cancelled)
        assert job_queries.claimable_models(session, max_attempts=3) == ["train:1"]
    assert claim(db, "w", 10) == []
    assert len(claim(db, "w", 10, model="train:1")) == 2


def test_expired_lease_makes_a_prompt_claimable_and_counts_attempts(db, settings):
    make_job(db, settings, 1)
    (first,) = claim(db, "a", 1)
    assert claim(db, "b", 1) == []  # leased
    expire_leases(db)
    (second,) = claim(db, "b", 1)
    assert second.id == first.id and second.attempts == 2
    with session_scope(db) as session:  # the first worker lost its lease: it cannot complete
        assert not job_queries.complete_prompt(
            session, worker_id="a", prompt_id=first.id, pair=pair_values(first.job_id)
        )
    with session_scope(db) as session:
        assert job_queries.complete_prompt(
            session, worker_id="b", prompt_id=first.id, pair=pair_values(first.job_id)
        )
    with session_scope(db) as session:
        assert session.scalar(select(Pair.prompt_id)) == first.id
    assert statuses(db)[first.id] == ("done", 2, None)


def test_last_attempt_expiring_fails_the_prompt(db, settings):
    make_job(db, settings, 1)
    for _ in range(2):
        claim(db, "w", 1, max_attempts=2)
        expire_leases(db)
    assert claim(db, "w", 1, max_attempts=2) == []
    with session_scope(db) as session:
        prompt = session.scalars(select(Prompt)).one()
        assert prompt.status == "failed" and "lease expired on attempt 2" in prompt.last_error


def test_fail_retries_until_attempts_run_out_and_not_when_not_retryable(db, settings):
    make_job(db, settings, 2)
    a, b = claim(db, "w", 2, max_attempts=2)
    with session_scope(db) as session:
        assert (
            queue.fail(
                session, queue.PROMPTS, worker_id="w", id=a.id, error="boom", retryable=True, max_attempts=2
            )
            == "queued"
        )
        assert (
            queue.fail(
                session,
                queue.PROMPTS,
                worker_id="w",
                id=b.id,
                error="prompt too long",
                retryable=False,
                max_attempts=2,
            )
            == "failed"
        )
    (again,) = claim(db, "w", 2, max_attempts=2)
    assert again.id == a.id and again.attempts == 2
    with session_scope(db) as session:
        assert (
            queue.fail(
                session, queue.PROMPTS, worker_id="w", id=a.id, error="boom", retryable=True, max_attempts=2
            )
            == "failed"
        )
    assert {s for s, _, _ in statuses(db).values()} == {"failed"}


def test_release_returns_prompts_at_once_without_counting_the_attempt(db, settings):
    make_job(db, settings, 3)
    held = claim(db, "w", 3)
    with session_scope(db) as session:
        assert queue.release(session, queue.PROMPTS, worker_id="w", ids=[p.id for p in held]) == 3
    assert all(v == ("queued", 0, None) for v in statuses(db).values())
    assert len(claim(db, "other", 3)) == 3


def test_a_prompt_never_gets_two_pairs(db, settings):
    job_id = make_job(db, settings, 1)
    (prompt,) = claim(db, "w", 1)
    with session_scope(db) as session:
        assert job_queries.complete_prompt(
            session, worker_id="w", prompt_id=prompt.id, pair=pair_values(job_id)
        )
    with session_scope(db) as session:  # a second completion (e.g. a replayed message) writes nothing
        assert not job_queries.complete_prompt(
            session, worker_id="w", prompt_id=prompt.id, pair=pair_values(job_id)
        )
    with session_scope(db) as session:
        assert len(session.scalars(select(Pair)).all()) == 1


def test_lease_renewal_reports_what_is_still_held(db, settings):
    make_job(db, settings, 2)
    a, b = claim(db, "w", 2)
    expire_leases(db)
    claim(db, "thief", 1)  # takes `a`, the lowest id
    with session_scope(db) as session:
        held = queue.renew(session, queue.PROMPTS, worker_id="w", ids=[a.id, b.id], lease_seconds=60)
    assert held == {b.id}
