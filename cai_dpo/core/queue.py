"""The one queue: claim, renew, expire, release and finish for every kind of leased work.

A leased row is a task: `queued -> running -> done | failed | cancelled` (a training job ends
`succeeded`). A worker claims rows with one `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)`,
which sets it as `lease_owner` until `lease_expires_at`, and renews the leases it holds in batch.
A lease that runs out (the worker was killed) makes the row claimable again, and that counts as
an attempt: a prompt that crashes every worker that takes it must end `failed`, not loop. A
worker that stops, or whose engine died, releases its rows at once, and that attempt is not
counted. Only the lease holder can finish a row, so a worker that lost its lease writes nothing.

Prompts, training jobs and evaluations are the kinds; each is a `WorkKind` that names its table,
its NOTIFY channel and what "cancelled" means for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    not_,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from cai_dpo.core.tables import Evaluation, GenerationJob, Prompt, TrainingJob


@dataclass(frozen=True)
class WorkKind:
    name: str
    table: Any  # a mapped class with status, attempts, lease_owner, lease_expires_at, ... columns
    channel: str
    # Rows whose work nobody wants any more.
    cancelled: Callable[[], ColumnElement[bool]]
    # Whether a holder loses its lease when its row is cancelled (a training run stops at once;
    # a prompt already running is cheap to finish).
    stop_when_cancelled: bool
    # Why a cancelled row was cancelled, where the service stopped its work (a job's budget): its
    # `last_error`; None keeps the row's own.
    cancel_reason: Callable[[], ColumnElement[Any]] | None = None


PROMPTS = WorkKind(
    name="prompts",
    table=Prompt,
    channel="cai_prompts",
    cancelled=lambda: Prompt.job_id.in_(
        select(GenerationJob.id).where(GenerationJob.cancelled_at.is_not(None)).scalar_subquery()
    ),
    stop_when_cancelled=False,
    # A prompt released back to the queue after its job reached its budget says so, as the
    # queued ones the budget cancelled do (`jobs.complete_prompts`).
    cancel_reason=lambda: (
        select(GenerationJob.stop_reason).where(GenerationJob.id == Prompt.job_id).scalar_subquery()
    ),
)
TRAINING = WorkKind(
    name="training",
    table=TrainingJob,
    channel="cai_training",
    cancelled=lambda: TrainingJob.cancel_requested.is_(True),
    stop_when_cancelled=True,
)
EVALUATIONS = WorkKind(
    name="evaluations",
    table=Evaluation,
    channel="cai_training",  # the training workers take them
    cancelled=lambda: false(),
    stop_when_cancelled=False,
)
KINDS = (PROMPTS, TRAINING, EVALUATIONS)


def _update(t: Any) -> Any:
    """An UPDATE of a queue table that leaves the ORM session alone: the queue's statements say
    in SQL which rows they change, and no caller reads those rows back from its session (the
    ORM's default synchronisation evaluated every statement's WHERE in Python, per call)."""
    return update(t).execution_options(synchronize_session=False)


def _lease_until(lease_seconds: float) -> ColumnElement[Any]:
    return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, lease_seconds)


def _lease_ran_out(t: Any) -> ColumnElement[bool]:
    return and_(t.status == "running", t.lease_expires_at < func.now())


def notify(session: Session, kind: WorkKind, payload: str = "") -> None:
    """Wake idle workers of this kind (delivered when the transaction commits)."""
    session.execute(
        text("SELECT pg_notify(:channel, :payload)"), {"channel": kind.channel, "payload": payload}
    )


def expire(session: Session, kind: WorkKind, *, max_attempts: int) -> None:
    """Settle rows nobody holds any more: cancelled ones end `cancelled`, and one whose lease ran
    out on its last attempt ends `failed` instead of being retried for ever."""
    t = kind.table
    unheld = or_(t.status == "queued", _lease_ran_out(t))
    reason = (
        {}
        if kind.cancel_reason is None
        else {"last_error": func.coalesce(kind.cancel_reason(), t.last_error)}
    )
    session.execute(
        _update(t)
        .where(unheld, kind.cancelled())
        .values(status="cancelled", finished_at=func.now(), lease_owner=None, lease_expires_at=None, **reason)
    )
    session.execute(
        _update(t)
        .where(_lease_ran_out(t), t.attempts >= max_attempts)
        .values(
            status="failed",
            finished_at=func.now(),
            lease_owner=None,
            lease_expires_at=None,
            last_error=func.concat(
                func.coalesce(t.last_error + "; ", ""), "lease expired on attempt ", t.attempts
            ),
        )
    )


def claimable(kind: WorkKind, *, max_attempts: int) -> ColumnElement[bool]:
    """Rows a worker may claim: queued, or running under a lease that ran out."""
    t = kind.table
    return and_(
        or_(t.status == "queued", _lease_ran_out(t)), t.attempts < max_attempts, not_(kind.cancelled())
    )


def has_pending(session: Session, kind: WorkKind) -> bool:
    """Whether any row waits for a worker or is held by one (`/health` warns when no worker is live)."""
    t = kind.table
    return bool(
        session.scalar(select(exists().where(t.status.in_(("queued", "running")), not_(kind.cancelled()))))
    )


def claim(
    session: Session,
    kind: WorkKind,
    *,
    worker_id: str,
    n: int,
    lease_seconds: float,
    max_attempts: int,
    where: Sequence[ColumnElement[bool]] = (),
    settle: bool = True,
) -> list[int]:
    """Claim up to `n` rows (oldest first) for `worker_id`; returns their ids in order.

    `settle=False` skips `expire` first: a worker that claims many times a second settles from
    its heartbeat instead (claimable rows are the same either way; settling only moves rows
    nobody may claim to their final state)."""
    if settle:
        expire(session, kind, max_attempts=max_attempts)
    t = kind.table
    candidates = (
        select(t.id)
        .where(claimable(kind, max_attempts=max_attempts), *where)
        .order_by(t.id)
        .limit(n)
        .with_for_update(skip_locked=True)
        .cte("candidates")
    )
    claimed = session.execute(
        _update(t)
        .where(t.id == candidates.c.id)
        .values(
            status="running",
            attempts=t.attempts + 1,
            lease_owner=worker_id,
            lease_expires_at=_lease_until(lease_seconds),
            started_at=func.coalesce(t.started_at, func.now()),
        )
        .returning(t.id)
    )
    return sorted(claimed.scalars())


def claim_one(
    session: Session, kind: WorkKind, *, worker_id: str, lease_seconds: float, max_attempts: int
) -> Any | None:
    """Claim the oldest claimable row of `kind` and return it (for kinds taken one at a time)."""
    ids = claim(
        session, kind, worker_id=worker_id, n=1, lease_seconds=lease_seconds, max_attempts=max_attempts
    )
    return session.get(kind.table, ids[0], populate_existing=True) if ids else None


def renew(
    session: Session, kind: WorkKind, *, worker_id: str, ids: Sequence[int], lease_seconds: float
) -> set[int]:
    """Extend the leases this worker still holds; returns the ids it still holds."""
    if not ids:
        return set()
    t = kind.table
    conditions = [t.id.in_(ids), t.lease_owner == worker_id, t.status == "running"]
    if kind.stop_when_cancelled:
        conditions.append(not_(kind.cancelled()))
    held = _locked_in_id_order(t, *conditions)
    rows = session.execute(
        _update(t)
        .where(t.id == held.c.id)
        .values(lease_expires_at=_lease_until(lease_seconds))
        .returning(t.id)
    )
    return set(rows.scalars())


def release(session: Session, kind: WorkKind, *, worker_id: str, ids: Sequence[int]) -> int:
    """Give rows back at once (worker stopping, engine dead): queued again, the attempt not counted."""
    if not ids:
        return 0
    t = kind.table
    result = session.execute(
        _update(t)
        .where(t.id.in_(ids), t.lease_owner == worker_id, t.status == "running")
        .values(
            status="queued",
            attempts=func.greatest(t.attempts - 1, 0),
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    notify(session, kind)
    return result.rowcount


def finish(session: Session, kind: WorkKind, *, worker_id: str, id: int, status: str, **values: Any) -> bool:
    """End a held row with `status` (and any other column values); False if the lease was lost."""
    return id in finish_many(session, kind, worker_id=worker_id, ids=[id], status=status, **values)


def finish_many(
    session: Session, kind: WorkKind, *, worker_id: str, ids: Sequence[int], status: str, **values: Any
) -> set[int]:
    """End the held rows among `ids` with `status`, in one statement; returns the ids ended (a row
    whose lease was lost is left alone)."""
    if not ids:
        return set()
    t = kind.table
    held = _locked_in_id_order(t, t.id.in_(ids), t.lease_owner == worker_id, t.status == "running")
    done = session.execute(
        _update(t)
        .where(t.id == held.c.id)
        .values(status=status, finished_at=func.now(), lease_owner=None, lease_expires_at=None, **values)
        .returning(t.id)
    )
    return set(done.scalars())


def _locked_in_id_order(t: Any, *conditions: ColumnElement[bool]) -> Any:
    """The rows matching `conditions`, locked in id order before an UPDATE of several rows.

    A worker's batched finish and its heartbeat's renewal update the same rows in two
    transactions at once; taking the row locks in one order (id) means they queue behind each
    other instead of deadlocking.
    """
    return select(t.id).where(*conditions).order_by(t.id).with_for_update().cte("held")


def fail(
    session: Session,
    kind: WorkKind,
    *,
    worker_id: str,
    id: int,
    error: str,
    retryable: bool,
    max_attempts: int,
) -> str | None:
    """Record the row's own fault: queued again if attempts remain and a retry may help, else
    `failed`. Returns the new status, or None if the lease was lost."""
    t = kind.table
    # Attempts count from the claim: a retry is only worth it while some are left.
    again = t.attempts < max_attempts if retryable else false()
    status = session.execute(
        _update(t)
        .where(t.id == id, t.lease_owner == worker_id, t.status == "running")
        .values(
            status=case((again, literal("queued")), else_=literal("failed")),
            finished_at=case((again, null()), else_=func.now()),
            last_error=error[:4000],
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(t.status)
    ).scalar_one_or_none()
    if status == "queued":  # an idle worker takes the retry at once, not at its next poll
        notify(session, kind)
    return status
