"""Training jobs: create, follow, claim, settle, cancel, and their per-step metrics."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core import queue
from cai_dpo.core.model_refs import TRAINED_PREFIX
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.tables import Pair, TrainingJob, TrainingMetric


def create_training_job(
    session: Session,
    *,
    base_model: str,
    dataset: dict[str, Any],
    params: dict[str, Any],
    policy: str | None = None,
    created_by: str | None = None,
) -> TrainingJob:
    job = TrainingJob(
        base_model=base_model, dataset=dataset, params=params, policy=policy, created_by=created_by
    )
    session.add(job)
    session.flush()
    queue.notify(session, queue.TRAINING)
    return job


def get_training_job(session: Session, train_id: int) -> TrainingJob | None:
    return session.get(TrainingJob, train_id)


def list_training_jobs(session: Session, *, limit: int, before_id: int | None = None) -> list[TrainingJob]:
    stmt = select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit)
    if before_id is not None:
        stmt = stmt.where(TrainingJob.id < before_id)
    return list(session.scalars(stmt))


def claim_training_job(
    session: Session, *, worker_id: str, lease_seconds: float, max_attempts: int
) -> TrainingJob | None:
    """Claim the oldest claimable training job, or None."""
    return queue.claim_one(
        session, queue.TRAINING, worker_id=worker_id, lease_seconds=lease_seconds, max_attempts=max_attempts
    )


def dataset_selection(job: TrainingJob) -> tuple[PairFilter, dict[str, Any]]:
    """The pairs a job trains on: its stored `/export` filters, and for an automatic job the pairs
    its policy marked with it (`policy_train_id`, as `pair_conditions` keyword arguments)."""
    filters = {k: v for k, v in job.dataset.items() if k != "policy_train_id"}
    taken_by = job.dataset.get("policy_train_id")
    selection = {"taken_by_policy_job": taken_by} if taken_by is not None else {}
    return PairFilter.model_validate(filters), selection


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
    """End a held job (`succeeded`, `failed`, `cancelled`); False if this worker lost it."""
    return queue.finish(
        session, queue.TRAINING, worker_id=worker_id, id=train_id, status=status, last_error=error, **values
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


def lineage(session: Session, train_id: int) -> list[int]:
    """The training job and the jobs its base model came from (`train:<id>` chains), newest first."""
    ids: list[int] = []
    job = session.get(TrainingJob, train_id)
    while job is not None and job.id not in ids:
        ids.append(job.id)
        base = job.base_model or ""
        parent = base.removeprefix(TRAINED_PREFIX)
        job = (
            session.get(TrainingJob, int(parent))
            if base.startswith(TRAINED_PREFIX) and parent.isdigit()
            else None
        )
    return ids


def trained_prompts(session: Session, train_id: int) -> list[list[dict[str, str]]]:
    """The distinct prompts of the pairs a trained model learned from: its job's training pairs and
    those of every job in its base model's lineage (held-out pairs excluded)."""
    jobs = lineage(session, train_id)
    trained_ids = (
        select(func.unnest(TrainingJob.pair_ids).label("pair_id")).where(TrainingJob.id.in_(jobs)).subquery()
    )
    return list(
        session.scalars(select(Pair.prompt).join(trained_ids, Pair.id == trained_ids.c.pair_id).distinct())
    )
