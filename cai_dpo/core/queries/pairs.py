"""Pairs: browse, stream for export, count, select for training, import."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core.pair_filter import PairFilter, filtered
from cai_dpo.core.tables import ConstitutionVersion, DatasetImport, GenerationJob, Pair, Prompt


def _pairs_with_version() -> Select:
    return select(Pair, ConstitutionVersion.content_hash).outerjoin(
        ConstitutionVersion, ConstitutionVersion.id == Pair.constitution_version_id
    )


def list_pairs(
    session: Session, f: PairFilter, *, after_id: int | None, limit: int
) -> list[tuple[Pair, str | None]]:
    stmt = filtered(_pairs_with_version(), f).order_by(Pair.id).limit(limit)
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
    Pair.scores,
    Pair.preference,
    Pair.scorer,
    Pair.margin,
    ConstitutionVersion.content_hash.label("constitution_version"),
)


def stream_pairs(session: Session, f: PairFilter, *, batch_size: int = 1000) -> Iterator[Any]:
    """Yield export rows in id order through a server-side cursor: memory stays flat."""
    stmt = filtered(
        select(*_EXPORT_COLUMNS).outerjoin(
            ConstitutionVersion, ConstitutionVersion.id == Pair.constitution_version_id
        ),
        f,
    ).order_by(Pair.id)
    yield from session.execute(stmt.execution_options(yield_per=batch_size))


def count_pairs(session: Session, f: PairFilter, **selection: Any) -> int:
    """Pairs matching the filter (and the `pair_conditions` selection keywords)."""
    return session.scalar(filtered(select(func.count(Pair.id)), f, **selection)) or 0


def pair_ids(session: Session, f: PairFilter, **selection: Any) -> list[int]:
    return list(session.scalars(filtered(select(Pair.id), f, **selection).order_by(Pair.id)))


def pairs_by_ids(session: Session, ids: Sequence[int]) -> list[Pair]:
    return list(session.scalars(select(Pair).where(Pair.id.in_(ids)).order_by(Pair.id)))


def pairs_total(session: Session) -> dict[str, int]:
    """Pairs stored and flagged, without counting the whole table: a done prompt has exactly one
    pair, an import records how many it added, and flagged pairs have an index of their own."""
    done = session.scalar(select(func.coalesce(func.sum(GenerationJob.n_prompts), 0))) - session.scalar(
        select(func.count()).where(Prompt.status != "done")
    )
    imported = session.scalar(select(func.coalesce(func.sum(DatasetImport.n_pairs), 0)))
    flagged = session.scalar(select(func.count()).where(Pair.flagged))
    return {"total": done + imported, "flagged": flagged}


def insert_imported_pairs(
    session: Session,
    *,
    source: str,
    format: str,
    rows: Iterable[dict[str, Any]],
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> DatasetImport | None:
    """Record an import and its pairs; None if another upload took the idempotency key first."""
    rows = list(rows)
    import_id = session.execute(
        insert(DatasetImport)
        .values(
            source=source,
            format=format,
            n_pairs=len(rows),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(DatasetImport.id)
    ).scalar_one_or_none()
    if import_id is None:
        return None
    if rows:
        session.execute(insert(Pair), [{**row, "import_id": import_id, "source": source} for row in rows])
    return session.get(DatasetImport, import_id)


def find_import_by_idempotency_key(session: Session, key: str) -> DatasetImport | None:
    return session.scalars(select(DatasetImport).where(DatasetImport.idempotency_key == key)).one_or_none()
