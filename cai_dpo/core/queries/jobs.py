"""Generation jobs and their prompts: create, follow, cancel, retry, and the prompt queue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from psycopg.types.json import Jsonb
from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core import queue
from cai_dpo.core.dedup import near_duplicates
from cai_dpo.core.export_format import prompt_text
from cai_dpo.core.generation_modes import CalibrateOptions, CompareOptions, GenerationMode, Sampling
from cai_dpo.core.tables import ConstitutionVersion, GenerationJob, Pair, Prompt

PromptStatus = Literal["queued", "running", "done", "failed", "cancelled"]
PROMPT_STATES: tuple[str, ...] = get_args(PromptStatus)


def find_job_by_idempotency_key(session: Session, key: str) -> GenerationJob | None:
    return session.scalars(select(GenerationJob).where(GenerationJob.idempotency_key == key)).one_or_none()


def create_generation_job(
    session: Session,
    *,
    constitution_version: ConstitutionVersion,
    model: str,
    revisions: int,
    sampling: Sampling,
    metadata: dict[str, Any],
    prompts: Sequence[list[dict[str, str]]],
    options: GenerationMode | CompareOptions | CalibrateOptions,
    idempotency_key: str | None,
    request_hash: str | None,
    created_by: str | None = None,
    max_generated_tokens: int | None = None,
) -> GenerationJob | None:
    """Insert a job and its prompt rows; None if another request took the idempotency key first."""
    job_id = session.execute(
        insert(GenerationJob)
        .values(
            constitution_version_id=constitution_version.id,
            constitution_name=constitution_version.name,
            model=model,
            revisions=revisions,
            # Stored as the models' dumps and read back by the same models (`ClaimedPrompt`).
            sampling=sampling.model_dump(mode="json"),
            options=options.model_dump(mode="json", exclude_none=True),
            job_metadata=metadata,
            n_prompts=len(prompts),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            created_by=created_by,
            max_generated_tokens=max_generated_tokens,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(GenerationJob.id)
    ).scalar_one_or_none()
    if job_id is None:
        return None
    # COPY: 10,000 prompts go in as one stream instead of 10,000 parameter sets.
    duplicates = near_duplicates([prompt_text(messages) for messages in prompts])
    cursor = session.connection().connection.driver_connection.cursor()
    with cursor.copy("COPY prompts (job_id, position, messages, duplicate_of) FROM STDIN") as copy:
        for position, messages in enumerate(prompts):
            copy.write_row((job_id, position, Jsonb(messages), duplicates[position]))
    queue.notify(session, queue.PROMPTS, model)
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


def pair_flags(session: Session, pair_ids: list[int]) -> dict[int, list[str]]:
    """The quality flags of these pairs (a prompt's listing says why its pair is left out, e.g.
    `no_harm_found`: nothing to critique, the first answer kept)."""
    if not pair_ids:
        return {}
    return dict(session.execute(select(Pair.id, Pair.flags).where(Pair.id.in_(pair_ids))).tuples().all())


def retry_failed_prompts(session: Session, job_id: int) -> int:
    """Queue a job's failed prompts again with fresh attempts; their last error stays for reference."""
    result = session.execute(
        update(Prompt)
        .where(Prompt.job_id == job_id, Prompt.status == "failed")
        .values(status="queued", attempts=0, finished_at=None)
    )
    if result.rowcount:
        queue.notify(session, queue.PROMPTS)
    return result.rowcount


@dataclass
class ClaimedPrompt:
    """A claimed prompt with what its trajectory needs from its job."""

    id: int
    job_id: int
    position: int
    messages: list[dict[str, str]]
    attempts: int
    revisions: int
    sampling: Sampling
    options: GenerationMode | CompareOptions | CalibrateOptions
    constitution_version_id: int
    constitution_hash: str
    constitution_name: str
    model: str


def claim_prompts(
    session: Session,
    *,
    worker_id: str,
    model: str,
    n: int,
    lease_seconds: float,
    max_attempts: int,
    settle: bool = True,
) -> list[ClaimedPrompt]:
    """Claim up to `n` prompts of jobs for `model`: queued ones, or ones whose lease ran out
    (`settle`: see `queue.claim`)."""
    ids = queue.claim(
        session,
        queue.PROMPTS,
        worker_id=worker_id,
        n=n,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        where=[Prompt.job_id.in_(select(GenerationJob.id).where(GenerationJob.model == model))],
        settle=settle,
    )
    if not ids:
        return []
    rows = session.execute(
        select(
            Prompt.id,
            Prompt.job_id,
            Prompt.position,
            Prompt.messages,
            Prompt.attempts,
            GenerationJob.revisions,
            GenerationJob.sampling,
            GenerationJob.options,
            GenerationJob.constitution_version_id,
            ConstitutionVersion.content_hash.label("constitution_hash"),
            GenerationJob.constitution_name,
            GenerationJob.model,
        )
        .join(GenerationJob, GenerationJob.id == Prompt.job_id)
        .join(ConstitutionVersion, ConstitutionVersion.id == GenerationJob.constitution_version_id)
        .where(Prompt.id.in_(ids))
        .order_by(Prompt.id)
    )
    return [
        ClaimedPrompt(
            **dict(row._mapping)
            | {"sampling": Sampling.model_validate(row.sampling), "options": job_options(row.options)}
        )
        for row in rows
    ]


def job_options(stored: dict[str, Any] | None) -> GenerationMode | CompareOptions | CalibrateOptions:
    """A job's options as stored: an evaluation's comparison, a judge's calibration, or a mode of
    `POST /generate`."""
    stored = stored or {}
    if stored.get("mode") == "compare":
        return CompareOptions.model_validate(stored)
    if stored.get("mode") == "calibrate":
        return CalibrateOptions.model_validate(stored)
    return GenerationMode.model_validate(stored)


def claimable_models(session: Session, *, max_attempts: int) -> list[str]:
    """Models that have prompts waiting (queued, or under a lease that ran out), most first: an
    idle worker may switch to one."""
    rows = session.execute(
        select(GenerationJob.model, func.count())
        .join(Prompt, Prompt.job_id == GenerationJob.id)
        .where(queue.claimable(queue.PROMPTS, max_attempts=max_attempts))
        .group_by(GenerationJob.model)
        .order_by(func.count().desc())
    )
    return [model for model, _ in rows]


def complete_prompt(session: Session, *, worker_id: str, prompt_id: int, pair: dict[str, Any]) -> bool:
    """Mark the prompt done and insert its pair, in the caller's transaction."""
    return prompt_id in complete_prompts(session, Pair, worker_id=worker_id, results={prompt_id: pair})


def complete_prompts(
    session: Session, table: Any, *, worker_id: str, results: dict[int, dict[str, Any]]
) -> set[int]:
    """Mark many prompts done and insert each one's result row (a pair, a comparison), all in the
    caller's one transaction; returns the prompts whose result was written.

    Only the lease holder completes: a prompt whose lease this worker lost (it stalled, the
    prompt went to another worker) is left alone and its result dropped. The result is unique per
    prompt: the last line of defence against a prompt retried after a crash yielding two. A
    worker killed before the commit wrote none of the batch: the leases run out and the prompts
    are made again.
    """
    done = queue.finish_many(
        session, queue.PROMPTS, worker_id=worker_id, ids=list(results), status="done", last_error=None
    )
    rows = [results[prompt_id] | {"prompt_id": prompt_id} for prompt_id in sorted(done)]
    if table is Pair and done:  # a near-duplicate of an earlier prompt of its job is flagged
        repeats = set(
            session.scalars(select(Prompt.id).where(Prompt.id.in_(done), Prompt.duplicate_of.is_not(None)))
        )
        for row in rows:
            if row["prompt_id"] in repeats and "duplicate_prompt" not in row.get("flags", []):
                row["flags"] = [*row.get("flags", []), "duplicate_prompt"]
    written: set[int] = set()
    # One INSERT per set of columns (executemany sends each set as multi-row VALUES).
    by_columns: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        by_columns.setdefault(frozenset(row), []).append(row)
    for same_columns in by_columns.values():
        inserted = session.execute(
            insert(table).on_conflict_do_nothing(index_elements=["prompt_id"]).returning(table.prompt_id),
            same_columns,
        )
        written.update(inserted.scalars())
    _add_usage(session, [row for row in rows if row["prompt_id"] in written])
    return written


def _add_usage(session: Session, rows: list[dict[str, Any]]) -> None:
    """Add the written results' usage to their jobs' totals, one statement per job of the batch
    (a batch is nearly always one job's), and stop a job whose generated tokens just reached its
    budget: its queued prompts end `cancelled`, saying why; the ones running finish.

    Jobs are updated in id order: two workers' batches of the same jobs queue behind each other
    instead of deadlocking."""
    totals: dict[int, list[float]] = {}
    for row in rows:
        usage = row.get("usage")
        if not usage or row.get("job_id") is None:
            continue
        total = totals.setdefault(row["job_id"], [0, 0, 0.0])
        total[0] += int(usage.get("completion_tokens") or 0)
        total[1] += int(usage.get("prompt_tokens") or 0)
        total[2] += float(usage.get("engine_seconds") or 0.0)
    for job_id in sorted(totals):
        generated, prompt_tokens, seconds = totals[job_id]
        job = GenerationJob.__table__.c
        # Counters only grow, so "before < budget <= after" holds in exactly one batch.
        crossed = (job.generated_tokens < job.max_generated_tokens) & (
            job.generated_tokens + generated >= job.max_generated_tokens
        )
        stopping = crossed & job.cancelled_at.is_(None)
        reason = func.concat("budget: max_generated_tokens ", job.max_generated_tokens, " reached")
        stopped = session.execute(
            update(GenerationJob.__table__)
            .where(job.id == job_id)
            .values(
                generated_tokens=job.generated_tokens + generated,
                prompt_tokens=job.prompt_tokens + prompt_tokens,
                engine_seconds=job.engine_seconds + seconds,
                cancelled_at=case((stopping, func.now()), else_=job.cancelled_at),
                stop_reason=case((stopping, reason), else_=job.stop_reason),
            )
            .returning(
                (job.generated_tokens - generated < job.max_generated_tokens)
                & (job.generated_tokens >= job.max_generated_tokens),
                job.stop_reason,
            )
        ).one_or_none()
        # Crossed now, and not already cancelled by its caller (whose stop says no budget).
        if stopped is not None and stopped[0] and stopped[1] is not None:
            session.execute(
                update(Prompt)
                .where(Prompt.job_id == job_id, Prompt.status == "queued")
                .values(status="cancelled", finished_at=func.now(), last_error=stopped[1])
                .execution_options(synchronize_session=False)
            )


def queue_depth(session: Session) -> dict[str, int]:
    """Prompts per state without counting the whole table (a `/metrics` scrape runs this).

    The prompts not done are counted through their partial index; `done` is the rest of the
    prompts the jobs were created with.
    """
    counts = dict.fromkeys(PROMPT_STATES, 0)
    counts.update(
        session.execute(
            select(Prompt.status, func.count()).where(Prompt.status != "done").group_by(Prompt.status)
        ).all()
    )
    total = session.scalar(select(func.coalesce(func.sum(GenerationJob.n_prompts), 0))) or 0
    counts["done"] = total - sum(counts.values())
    return counts
