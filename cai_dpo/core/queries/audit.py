"""The audit log: every mutating API call, who made it and on which ids."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cai_dpo.core.tables import AuditEntry


def record(session: Session, **values: Any) -> None:
    session.add(AuditEntry(**values))


def recent(
    session: Session, *, limit: int, before_id: int | None = None, key_name: str | None = None
) -> list[AuditEntry]:
    stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before_id is not None:
        stmt = stmt.where(AuditEntry.id < before_id)
    if key_name is not None:
        stmt = stmt.where(AuditEntry.key_name == key_name)
    return list(session.scalars(stmt))
