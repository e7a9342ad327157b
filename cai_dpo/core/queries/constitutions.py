"""Constitution versions: every text ever used, by content hash."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core.constitutions import Constitution
from cai_dpo.core.tables import ConstitutionVersion, Pair


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


def find_version(session: Session, name: str, version: str) -> ConstitutionVersion | None:
    """A version of `name` by its content hash or a prefix of it (8 characters at least)."""
    if len(version) < 8:
        return None
    rows = session.scalars(
        select(ConstitutionVersion)
        .where(
            ConstitutionVersion.name == name,
            ConstitutionVersion.content_hash.startswith(version, autoescape=True),
        )
        .limit(2)
    ).all()
    return rows[0] if len(rows) == 1 else None
