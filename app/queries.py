"""Every database access of the service, as named functions over a SQLAlchemy session.

Reading the queue's behaviour means reading this file: the claim is one `UPDATE ... FROM (SELECT
... FOR UPDATE SKIP LOCKED)` statement, leases are renewed in batch, and completing a prompt
marks it done and inserts its pair in the caller's one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from psycopg.types.json import Jsonb
from sqlalchemy import ColumnElement, Select, and_, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.constitutions import Constitution
from app.models import (
    ConstitutionVersion,
    DatasetImport,
    GenerationJob,
    Pair,
    Prompt,
    TrainingJob,
    TrainingMetric,
    TrainPolicy,
    Worker,
)

PROMPTS_CHANNEL = "cai_prompts"
TRAINING_CHANNEL = "cai_training"

PromptStatus = Literal["queued", "running", "done", "failed", "cancelled"]
PROMPT_STATES: tuple[str, ...] = get_args(PromptStatus)


# --- constitutions --------------------------------------------------------------------------------


def store_constitution_version(session: Session, constitution: Constitution) -> ConstitutionVersion:
    """Record this exact text of the constitution (once per content hash) and return its row."""
    session.execute(
        insert(ConstitutionVersion)
        .values(
            name=constitution.name,
            content_hash=constitution.version,
            body=constitution.text,
            spec=constitution.spec.model_dump(mode="json"),
        )
        .on_conflict_do_nothing(index_elements=["name", "content_hash"])
    )
    return session.scalars(
        select(ConstitutionVersion).where(
            ConstitutionVersion.name == constitution.name,
            ConstitutionVersion.content_hash == constitution.version,
        )
    ).one()


def constitution_versions(session: Session, name: str) -> list[dict[str, Any]]:
    """Versions of `name` used so far, newest first, with how many pairs each produced."""
    rows = session.execute(
        select(
            ConstitutionVersion.id,
            ConstitutionVersion.content_hash,
            ConstitutionVersion.created_at,
            select(func.count(Pair.id))
            .where(Pair.constitution_version_id == ConstitutionVersion.id)
            .scalar_subquery()
            .label("n_pairs"),
        )
        .where(ConstitutionVersion.name == name)
        .order_by(ConstitutionVersion.id.desc())
    )
    return [
        {"version": r.content_hash, "first_used_at": r.created_at, "n_pairs": r.n_pairs, "id": r.id}
        for r in rows
    ]


def get_constitution_version(session: Session, version_id: int) -> ConstitutionVersion | None:
    return session.get(ConstitutionVersion, version_id)


# --- generation jobs ------------------------------------------------------------------------------


def find_job_by_idempotency_key(session: Session, key: str) -> GenerationJob | None:
    return session.scalars(select(GenerationJob).where(GenerationJob.idempotency_key == key)).one_or_none()


def create_generation_job(
    session: Session,
    *,
    constitution_version: ConstitutionVersion,
    model: str,
    revisions: int,
    sampling: dict[str, Any],
    metadata: dict[str, Any],
    prompts: Sequence[list[dict[str, str]]],
    idempotency_key: str | None,
    request_hash: str | None,
) -> GenerationJob | None:
    """Insert a job and its prompt rows; None if another request took the idempotency key first."""
    job_id = session.execute(
        insert(GenerationJob)
        .values(
            constitution_version_id=constitution_version.id,
            constitution_name=constitution_version.name,
            model=model,
            revisions=revisions,
            sampling=sampling,
            job_metadata=metadata,
            n_prompts=len(prompts),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(GenerationJob.id)
    ).scalar_one_or_none()
    if job_id is None:
        return None
    # COPY: 10,000 prompts go in as one stream instead of 10,000 parameter sets.
    cursor = session.connection().connection.driver_connection.cursor()
    with cursor.copy("COPY prompts (job_id, position, messages) FROM STDIN") as copy:
        for position, messages in enumerate(prompts):
            copy.write_row((job_id, position, Jsonb(messages)))
    session.execute(
        text("SELECT pg_notify(:channel, :payload)"), {"channel": PROMPTS_CHANNEL, "payload": model}
    )
    return session.get(GenerationJob, job_id)


def get_job(session: Session, job_id: int) -> GenerationJob | None:
    return session.get(GenerationJob, job_id)


def list_jobs(session: Session, *, limit: int, before_id: int | None = None) -> list[GenerationJob]:
    stmt = select(GenerationJob).order_by(GenerationJob.id.desc()).limit(limit)
    if before_id is not None:
        stmt = stmt.where(GenerationJob.id < before_id)
    return list(session.scalars(stmt))


@dataclass
class JobStats:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROMPT_STATES, 0))
    flagged: int = 0
    first_started_at: datetime | None = None
    last_finished_at: datetime | None = None


def job_stats(session: Session, job_ids: Sequence[int]) -> dict[int, JobStats]:
    """Prompt counts per state, flagged pairs and timing of each job, in two grouped queries."""
    stats = {job_id: JobStats() for job_id in job_ids}
    if not job_ids:
        return stats
    rows = session.execute(
        select(
            Prompt.job_id,
            Prompt.status,
            func.count(),
            func.min(Prompt.started_at),
            func.max(Prompt.finished_at),
        )
        .where(Prompt.job_id.in_(job_ids))
        .group_by(Prompt.job_id, Prompt.status)
    )
    for job_id, status, count, started, finished in rows:
        entry = stats[job_id]
        entry.counts[status] = count
        if started and (entry.first_started_at is None or started < entry.first_started_at):
            entry.first_started_at = started
        if finished and (entry.last_finished_at is None or finished > entry.last_finished_at):
            entry.last_finished_at = finished
    flagged = session.execute(
        select(Pair.job_id, func.count()).where(Pair.job_id.in_(job_ids), Pair.flagged).group_by(Pair.job_id)
    )
    for job_id, count in flagged:
        stats[job_id].flagged = count
    return stats


def cancel_job(session: Session, job_id: int) -> int:
    """Mark the job cancelled and its unclaimed prompts `cancelled`; running ones finish."""
    session.execute(
        update(GenerationJob)
        .where(GenerationJob.id == job_id, GenerationJob.cancelled_at.is_(None))
        .values(cancelled_at=func.now())
    )
    result = session.execute(
        update(Prompt)
        .where(Prompt.job_id == job_id, Prompt.status == "queued")
        .values(status="cancelled", finished_at=func.now())
    )
    return result.rowcount


def list_job_prompts(
    session: Session, job_id: int, *, status: PromptStatus | None, after_id: int | None, limit: int
) -> list[tuple[Prompt, int | None]]:
    """A job's prompt rows in id order, each with the id of its pair if it has one."""
    stmt = (
        select(Prompt, Pair.id)
        .outerjoin(Pair, Pair.prompt_id == Prompt.id)
        .where(Prompt.job_id == job_id)
        .order_by(Prompt.id)
        .limit(limit)
    )
    if status is not None:
        stmt = stmt.where(Prompt.status == status)
    if after_id is not None:
        stmt = stmt.where(Prompt.id > after_id)
    return [tuple(row) for row in session.execute(stmt)]


def retry_failed_prompts(session: Session, job_id: int) -> int:
    """Queue a job's failed prompts again with fresh attempts; their last error stays for reference."""
    result = session.execute(
        update(Prompt)
        .where(Prompt.job_id == job_id, Prompt.status == "failed")
        .values(status="queued", attempts=0, finished_at=None)
    )
    if result.rowcount:
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": PROMPTS_CHANNEL})
    return result.rowcount


# --- the prompt queue -----------------------------------------------------------------------------


@dataclass
class ClaimedPrompt:
    id: int
    job_id: int
    position: int
    messages: list[dict[str, str]]
    attempts: int
    revisions: int
    sampling: dict[str, Any]
    constitution_version_id: int
    constitution_hash: str
    constitution_name: str
    model: str


_CLAIM_PROMPTS = text("""
    WITH claimable AS (
        SELECT p.id
        FROM prompts p JOIN generation_jobs j ON j.id = p.job_id
        WHERE (p.status = 'queued' OR (p.status = 'running' AND p.lease_expires_at < now()))
          AND p.attempts < :max_attempts
          AND j.model = :model
          AND j.cancelled_at IS NULL
        ORDER BY p.id
        LIMIT :n
        FOR UPDATE OF p SKIP LOCKED
    )
    UPDATE prompts p
    SET status = 'running', attempts = p.attempts + 1, lease_owner = :worker,
        lease_expires_at = now() + make_interval(secs => :lease), started_at = coalesce(p.started_at, now())
    FROM claimable c, generation_jobs j, constitution_versions cv
    WHERE p.id = c.id AND j.id = p.job_id AND cv.id = j.constitution_version_id
    RETURNING p.id, p.job_id, p.position, p.messages, p.attempts, j.revisions, j.sampling,
              j.constitution_version_id, cv.content_hash AS constitution_hash, j.constitution_name, j.model
""")

# A prompt whose lease ran out on its last attempt is failed, not retried for ever.
_FAIL_EXHAUSTED = text("""
    UPDATE prompts
    SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = coalesce(last_error || '; ', '') || 'lease expired on attempt ' || attempts
    WHERE status = 'running' AND lease_expires_at < now() AND attempts >= :max_attempts
""")


def claim_prompts(
    session: Session, *, worker_id: str, model: str, n: int, lease_seconds: float, max_attempts: int
) -> list[ClaimedPrompt]:
    """Claim up to `n` prompts for `model`: queued ones, or running ones whose lease ran out."""
    session.execute(_FAIL_EXHAUSTED, {"max_attempts": max_attempts})
    rows = session.execute(
        _CLAIM_PROMPTS,
        {"max_attempts": max_attempts, "model": model, "n": n, "worker": worker_id, "lease": lease_seconds},
    )
    return sorted((ClaimedPrompt(**row._mapping) for row in rows), key=lambda p: p.id)


def claimable_models(session: Session) -> list[str]:
    """Models that have prompts waiting, most waiting first (a worker may switch to one)."""
    rows = session.execute(
        select(GenerationJob.model, func.count())
        .join(Prompt, Prompt.job_id == GenerationJob.id)
        .where(Prompt.status == "queued", GenerationJob.cancelled_at.is_(None))
        .group_by(GenerationJob.model)
        .order_by(func.count().desc())
    )
    return [model for model, _ in rows]


def renew_prompt_leases(
    session: Session, *, worker_id: str, prompt_ids: Sequence[int], lease_seconds: float
) -> set[int]:
    """Extend the leases this worker still holds; returns the ids it still holds."""
    if not prompt_ids:
        return set()
    rows = session.execute(
        update(Prompt)
        .where(Prompt.id.in_(prompt_ids), Prompt.lease_owner == worker_id, Prompt.status == "running")
        .values(lease_expires_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, lease_seconds))
        .returning(Prompt.id)
    )
    return set(rows.scalars())


def complete_prompt(session: Session, *, worker_id: str, prompt_id: int, pair: dict[str, Any]) -> bool:
    """Mark the prompt done and insert its pair, in the caller's transaction.

    Only the lease holder completes: a worker that lost its lease (it stalled, the prompt went to
    another worker) writes nothing. The unique pair per prompt is the last line of defence.
    """
    done = session.execute(
        update(Prompt)
        .where(Prompt.id == prompt_id, Prompt.lease_owner == worker_id, Prompt.status == "running")
        .values(
            status="done", finished_at=func.now(), lease_owner=None, lease_expires_at=None, last_error=None
        )
        .returning(Prompt.id)
    ).scalar_one_or_none()
    if done is None:
        return False
    inserted = session.execute(
        insert(Pair)
        .values(prompt_id=prompt_id, **pair)
        .on_conflict_do_nothing(index_elements=["prompt_id"])
        .returning(Pair.id)
    ).scalar_one_or_none()
    return inserted is not None


def fail_prompt(
    session: Session, *, worker_id: str, prompt_id: int, error: str, retryable: bool, max_attempts: int
) -> str | None:
    """Record an error: back to `queued` if attempts remain and it may help, else `failed`."""
    return session.execute(
        text("""
            UPDATE prompts
            SET status = CASE WHEN :retryable AND attempts < :max_attempts THEN 'queued' ELSE 'failed' END,
                finished_at = CASE WHEN :retryable AND attempts < :max_attempts THEN NULL ELSE now() END,
                last_error = :error, lease_owner = NULL, lease_expires_at = NULL
            WHERE id = :id AND lease_owner = :worker AND status = 'running'
            RETURNING status
        """),
        {
            "retryable": retryable,
            "max_attempts": max_attempts,
            "error": error[:4000],
            "id": prompt_id,
            "worker": worker_id,
        },
    ).scalar_one_or_none()


def release_prompts(session: Session, *, worker_id: str, prompt_ids: Sequence[int]) -> int:
    """Give prompts back at once (worker stopping): queued again, the attempt not counted."""
    if not prompt_ids:
        return 0
    result = session.execute(
        update(Prompt)
        .where(Prompt.id.in_(prompt_ids), Prompt.lease_owner == worker_id, Prompt.status == "running")
        .values(
            status="queued",
            attempts=func.greatest(Prompt.attempts - 1, 0),
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": PROMPTS_CHANNEL})
    return result.rowcount


def queue_depth(session: Session) -> dict[str, int]:
    counts = dict.fromkeys(PROMPT_STATES, 0)
    counts.update(session.execute(select(Prompt.status, func.count()).group_by(Prompt.status)).all())
    return counts


# --- workers --------------------------------------------------------------------------------------


def record_worker_heartbeat(session: Session, **values: Any) -> None:
    stmt = insert(Worker).values(**values, heartbeat_at=func.now())
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={key: stmt.excluded[key] for key in values if key != "id"} | {"heartbeat_at": func.now()},
        )
    )


def mark_worker_stopped(session: Session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=func.now(), in_flight=0))


def live_workers(session: Session, *, seen_seconds: float, kind: str | None = None) -> list[Worker]:
    stmt = (
        select(Worker)
        .where(
            Worker.stopped_at.is_(None),
            Worker.heartbeat_at > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seen_seconds),
        )
        .order_by(Worker.kind, Worker.id)
    )
    if kind:
        stmt = stmt.where(Worker.kind == kind)
    return list(session.scalars(stmt))


# --- pairs ----------------------------------------------------------------------------------------


@dataclass
class PairFilter:
    job_id: int | None = None
    constitution: str | None = None
    constitution_version: str | None = None
    since: datetime | None = None
    include_flagged: bool = False
    source: str | None = None
    import_id: int | None = None
    min_id: int | None = None
    max_id: int | None = None
    ids: Sequence[int] | None = None
    # The pairs an automatic training job took; `untaken_by_policy` those no automatic job took yet.
    policy_train_id: int | None = None
    untaken_by_policy: bool = False


def filter_pairs(stmt: Select, f: PairFilter) -> Select:
    conditions = pair_conditions(f)
    return stmt.where(and_(*conditions)) if conditions else stmt


def pair_conditions(f: PairFilter) -> list[ColumnElement[bool]]:
    conditions = []
    if f.job_id is not None:
        conditions.append(Pair.job_id == f.job_id)
    if f.constitution is not None:
        conditions.append(Pair.constitution_name == f.constitution)
    if f.constitution_version is not None:  # the full hash or a prefix of it, as git takes
        versions = select(ConstitutionVersion.id).where(
            ConstitutionVersion.content_hash.startswith(f.constitution_version, autoescape=True)
        )
        conditions.append(Pair.constitution_version_id.in_(versions))
    if f.since is not None:
        conditions.append(Pair.created_at >= f.since)
    if not f.include_flagged:
        conditions.append(Pair.flagged.is_(False))
    if f.source is not None:
        conditions.append(Pair.source == f.source)
    if f.import_id is not None:
        conditions.append(Pair.import_id == f.import_id)
    if f.min_id is not None:
        conditions.append(Pair.id >= f.min_id)
    if f.max_id is not None:
        conditions.append(Pair.id <= f.max_id)
    if f.ids is not None:
        conditions.append(Pair.id.in_(f.ids))
    if f.policy_train_id is not None:
        conditions.append(Pair.policy_train_id == f.policy_train_id)
    if f.untaken_by_policy:
        conditions.append(Pair.policy_train_id.is_(None))
    return conditions


def _pairs_with_version() -> Select:
    return select(Pair, ConstitutionVersion.content_hash).outerjoin(
        ConstitutionVersion, ConstitutionVersion.id == Pair.constitution_version_id
    )


def list_pairs(
    session: Session, f: PairFilter, *, after_id: int | None, limit: int
) -> list[tuple[Pair, str | None]]:
    stmt = filter_pairs(_pairs_with_version(), f).order_by(Pair.id).limit(limit)
    if after_id is not None:
        stmt = stmt.where(Pair.id > after_id)
    return [tuple(row) for row in session.execute(stmt)]


def get_pair(session: Session, pair_id: int) -> tuple[Pair, str | None] | None:
    row = session.execute(_pairs_with_version().where(Pair.id == pair_id)).one_or_none()
    return tuple(row) if row else None


_EXPORT_COLUMNS = (
    Pair.id,
    Pair.prompt,
    Pair.chosen,
    Pair.rejected,
    Pair.source,
    Pair.constitution_name,
    Pair.trajectory["principles"].label("principles"),
    Pair.flags,
    Pair.model,
    Pair.job_id,
    ConstitutionVersion.content_hash.label("constitution_version"),
)


def stream_pairs(session: Session, f: PairFilter, *, batch_size: int = 1000) -> Iterator[Any]:
    """Yield export rows in id order through a server-side cursor: memory stays flat."""
    stmt = filter_pairs(
        select(*_EXPORT_COLUMNS).outerjoin(
            ConstitutionVersion, ConstitutionVersion.id == Pair.constitution_version_id
        ),
        f,
    ).order_by(Pair.id)
    yield from session.execute(stmt.execution_options(yield_per=batch_size))


def count_pairs(session: Session, f: PairFilter) -> int:
    return session.scalar(filter_pairs(select(func.count(Pair.id)), f)) or 0


def pair_ids(session: Session, f: PairFilter) -> list[int]:
    return list(session.scalars(filter_pairs(select(Pair.id), f).order_by(Pair.id)))


def pairs_by_ids(session: Session, ids: Sequence[int]) -> list[Pair]:
    return list(session.scalars(select(Pair).where(Pair.id.in_(ids)).order_by(Pair.id)))


def pairs_total(session: Session) -> dict[str, int]:
    row = session.execute(select(func.count(Pair.id), func.count(Pair.id).filter(Pair.flagged))).one()
    return {"total": row[0], "flagged": row[1]}


def insert_imported_pairs(
    session: Session, *, source: str, format: str, rows: Iterable[dict[str, Any]]
) -> DatasetImport:
    rows = list(rows)
    record = DatasetImport(source=source, format=format, n_pairs=len(rows))
    session.add(record)
    session.flush()
    if rows:
        session.execute(insert(Pair), [{**row, "import_id": record.id, "source": source} for row in rows])
    return record


# --- training -------------------------------------------------------------------------------------


def create_training_job(
    session: Session,
    *,
    base_model: str,
    dataset: dict[str, Any],
    params: dict[str, Any],
    policy: str | None = None,
) -> TrainingJob:
    job = TrainingJob(base_model=base_model, dataset=dataset, params=params, policy=policy)
    session.add(job)
    session.flush()
    session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": TRAINING_CHANNEL})
    return job


def get_training_job(session: Session, train_id: int) -> TrainingJob | None:
    return session.get(TrainingJob, train_id)


def list_training_jobs(session: Session, *, limit: int, before_id: int | None = None) -> list[TrainingJob]:
    stmt = select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit)
    if before_id is not None:
        stmt = stmt.where(TrainingJob.id < before_id)
    return list(session.scalars(stmt))


_CLAIM_TRAINING = text("""
    WITH claimable AS (
        SELECT id FROM training_jobs
        WHERE (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
          AND attempts < :max_attempts AND NOT cancel_requested
        ORDER BY id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE training_jobs t
    SET status = 'running', attempts = t.attempts + 1, lease_owner = :worker,
        lease_expires_at = now() + make_interval(secs => :lease), started_at = coalesce(t.started_at, now())
    FROM claimable c
    WHERE t.id = c.id
    RETURNING t.id
""")

_FAIL_EXHAUSTED_TRAINING = text("""
    UPDATE training_jobs
    SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = coalesce(last_error || '; ', '') || 'lease expired on attempt ' || attempts
    WHERE status = 'running' AND lease_expires_at < now() AND attempts >= :max_attempts
""")

_CANCEL_UNCLAIMED_TRAINING = text("""
    UPDATE training_jobs
    SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
    WHERE cancel_requested AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
""")


def claim_training_job(
    session: Session, *, worker_id: str, lease_seconds: float, max_attempts: int
) -> TrainingJob | None:
    session.execute(_FAIL_EXHAUSTED_TRAINING, {"max_attempts": max_attempts})
    session.execute(_CANCEL_UNCLAIMED_TRAINING)
    train_id = session.execute(
        _CLAIM_TRAINING, {"max_attempts": max_attempts, "worker": worker_id, "lease": lease_seconds}
    ).scalar_one_or_none()
    return session.get(TrainingJob, train_id) if train_id is not None else None


def renew_training_lease(session: Session, *, worker_id: str, train_id: int, lease_seconds: float) -> bool:
    """Extend the lease; False if this worker no longer holds the job or it was cancelled."""
    held = session.execute(
        update(TrainingJob)
        .where(
            TrainingJob.id == train_id,
            TrainingJob.lease_owner == worker_id,
            TrainingJob.status == "running",
            TrainingJob.cancel_requested.is_(False),
        )
        .values(lease_expires_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, lease_seconds))
        .returning(TrainingJob.id)
    ).scalar_one_or_none()
    return held is not None


def update_training_job(
    session: Session, train_id: int, *, worker_id: str | None = None, **values: Any
) -> bool:
    stmt = update(TrainingJob).where(TrainingJob.id == train_id)
    if worker_id is not None:
        stmt = stmt.where(TrainingJob.lease_owner == worker_id)
    return session.execute(stmt.values(**values).returning(TrainingJob.id)).scalar_one_or_none() is not None


def finish_training_job(
    session: Session, train_id: int, *, worker_id: str, status: str, error: str | None = None, **values: Any
) -> bool:
    return update_training_job(
        session,
        train_id,
        worker_id=worker_id,
        status=status,
        last_error=error,
        finished_at=func.now(),
        lease_owner=None,
        lease_expires_at=None,
        **values,
    )


def release_training_job(session: Session, *, worker_id: str, train_id: int) -> None:
    session.execute(
        update(TrainingJob)
        .where(
            TrainingJob.id == train_id, TrainingJob.lease_owner == worker_id, TrainingJob.status == "running"
        )
        .values(
            status="queued",
            attempts=func.greatest(TrainingJob.attempts - 1, 0),
            lease_owner=None,
            lease_expires_at=None,
        )
    )


def request_training_cancel(session: Session, train_id: int) -> TrainingJob | None:
    job = session.get(TrainingJob, train_id, with_for_update=True)
    if job is None:
        return None
    if job.status in ("queued", "running"):
        job.cancel_requested = True
        if job.status == "queued":
            job.status = "cancelled"
            job.finished_at = func.now()
    return job


def record_training_metrics(session: Session, train_id: int, step: int, values: dict[str, Any]) -> None:
    stmt = insert(TrainingMetric).values(train_id=train_id, step=step, values=values)
    # A resumed job repeats the steps after its last checkpoint: the newer values win.
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["train_id", "step"], set_={"values": stmt.excluded["values"]}
        )
    )


def training_metrics(session: Session, train_id: int) -> list[TrainingMetric]:
    return list(
        session.scalars(
            select(TrainingMetric).where(TrainingMetric.train_id == train_id).order_by(TrainingMetric.step)
        )
    )


def latest_training_metric(session: Session, train_id: int) -> TrainingMetric | None:
    return session.scalars(
        select(TrainingMetric)
        .where(TrainingMetric.train_id == train_id)
        .order_by(TrainingMetric.step.desc())
        .limit(1)
    ).one_or_none()


def training_job_counts(session: Session) -> dict[str, int]:
    return dict(session.execute(select(TrainingJob.status, func.count()).group_by(TrainingJob.status)).all())


# --- automatic training policies ------------------------------------------------------------------


def upsert_train_policy(session: Session, *, constitution_name: str, **values: Any) -> TrainPolicy:
    stmt = insert(TrainPolicy).values(constitution_name=constitution_name, **values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["constitution_name"],
            set_={**{k: stmt.excluded[k] for k in values}, "updated_at": func.now()},
        )
    )
    return session.get(TrainPolicy, constitution_name, populate_existing=True)


def list_train_policies(session: Session) -> list[TrainPolicy]:
    return list(session.scalars(select(TrainPolicy).order_by(TrainPolicy.constitution_name)))


def get_train_policy(session: Session, name: str) -> TrainPolicy | None:
    return session.get(TrainPolicy, name)


def delete_train_policy(session: Session, name: str) -> bool:
    policy = session.get(TrainPolicy, name)
    if policy is None:
        return False
    session.delete(policy)
    return True


def policy_pairs_waiting(session: Session, constitution_name: str) -> int:
    """Unflagged pairs of the constitution that no automatic training job has taken yet."""
    return count_pairs(session, PairFilter(constitution=constitution_name, untaken_by_policy=True))


def queue_policy_training(session: Session, policy_name: str, *, default_model: str) -> TrainingJob | None:
    """Queue one automatic job once `min_new_pairs` untaken unflagged pairs exist; it takes them all.

    The policy row is locked for the count and the marking, so concurrent callers (API processes,
    workers) queue exactly one job for the same pairs. Each pair is marked with the job that took
    it, rather than compared with an id watermark: a pair whose transaction commits after one with
    a higher id (a long import beside running workers) is still counted next time.
    """
    policy = session.get(TrainPolicy, policy_name, with_for_update=True, populate_existing=True)
    if policy is None or not policy.enabled:
        return None
    untaken = PairFilter(constitution=policy.constitution_name, untaken_by_policy=True)
    if count_pairs(session, untaken) < policy.min_new_pairs:
        return None
    job = create_training_job(
        session,
        base_model=policy.base_model or default_model,
        dataset={},
        params=policy.params,
        policy=policy.constitution_name,
    )
    job.dataset = {"constitution": policy.constitution_name, "policy_train_id": job.id}
    # Pairs committed since the count are taken too: the job's dataset is exactly the marked pairs.
    session.execute(update(Pair).where(*pair_conditions(untaken)).values(policy_train_id=job.id))
    return job
