"""Live workers, as their heartbeats report them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core import queue
from cai_dpo.core.tables import Worker


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


def pending_work(session: Session) -> dict[str, bool]:
    """Per worker kind, whether work waits for it (or is held by a worker that may be gone)."""
    return {
        "generate": queue.has_pending(session, queue.PROMPTS),
        "train": queue.has_pending(session, queue.TRAINING) or queue.has_pending(session, queue.EVALUATIONS),
    }
