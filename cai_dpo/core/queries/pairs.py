"""Pairs: browse, stream for export, count, select for training, import."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from cai_dpo.core.pair_filter import PairFilter, filtered
from cai_dpo.core.tables import ConstitutionVersion, DatasetImport, GenerationJob, Pair, PairReview


def _pairs_with_version() -> Select:
    return select(Pair, ConstitutionVersion.content_hash).outerjoin(
        ConstitutionVersion, ConstitutionVersion.id == Pair.constitution_version_id
    )


def list_pairs(
    session: Session, f: PairFilter, *, after_id: int | None, limit: int, before_id: int | None = None
) -> list[tuple[Pair, str | None]]:
    """A page in id order: after `after_id`, or the page just before `before_id` (paging back)."""
    if before_id is not None:
        stmt = filtered(_pairs_with_version(), f).where(Pair.id < before_id).order_by(Pair.id.desc())
        return [tuple(row) for row in reversed(session.execute(stmt.limit(limit)).all())]
    stmt = filtered(_pairs_with_version(), f).order_by(Pair.id).limit(limit)
    if after_id is not None:
        stmt = stmt.where(Pair.id > after_id)
    return [tuple(row) for row in session.execute(stmt)]


def previous_id(session: Session, f: PairFilter, pair_id: int) -> int | None:
    """The id of the pair just before `pair_id` among those the filter selects (ORDER BY ... LIMIT 1,
    not max(): with an anti-join, as `review=unreviewed` makes, only the limit stops the scan early)."""
    stmt = filtered(select(Pair.id), f).where(Pair.id < pair_id).order_by(Pair.id.desc()).limit(1)
    return session.scalar(stmt)


def next_id(session: Session, f: PairFilter, pair_id: int) -> int | None:
    """The id of the pair just after `pair_id` among those the filter selects."""
    return session.scalar(filtered(select(Pair.id), f).where(Pair.id > pair_id).order_by(Pair.id).limit(1))


def get_pair(session: Session, pair_id: int) -> tuple[Pair, str | None] | None:
    row = session.execute(_pairs_with_version().where(Pair.id == pair_id)).one_or_none()
    return tuple(row) if row else None


_EXPORT_COLUMNS = (
    Pair.id,
    Pair.prompt,
    # A reviewer's edit, where the pair has one, is the chosen answer of the dataset.
    func.coalesce(PairReview.chosen_text, Pair.chosen).label("chosen"),
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
    PairReview.status.label("review"),
    Pair.pair_metadata,
)


def stream_pairs(session: Session, f: PairFilter, *, batch_size: int = 1000) -> Iterator[Any]:
    """Yield export rows in id order through a server-side cursor: memory stays flat."""
    stmt = filtered(
        select(*_EXPORT_COLUMNS)
        .outerjoin(ConstitutionVersion, ConstitutionVersion.id == Pair.constitution_version_id)
        .outerjoin(PairReview, (PairReview.pair_id == Pair.id) & PairReview.latest),
        f,
    ).order_by(Pair.id)
    yield from session.execute(stmt.execution_options(yield_per=batch_size))


def count_pairs(session: Session, f: PairFilter, **selection: Any) -> int:
    """Pairs matching the filter (and the `pair_conditions` selection keywords)."""
    return session.scalar(filtered(select(func.count(Pair.id)), f, **selection)) or 0


def pair_ids(session: Session, f: PairFilter, **selection: Any) -> list[int]:
    return list(session.scalars(filtered(select(Pair.id), f, **selection).order_by(Pair.id)))


def pair_prompts(session: Session, f: PairFilter, **selection: Any) -> list[tuple[int, list[dict[str, str]]]]:
    """`pair_ids` with each pair's prompt: what a split by prompt needs."""
    query = filtered(select(Pair.id, Pair.prompt), f, **selection).order_by(Pair.id)
    return [(pair_id, prompt) for pair_id, prompt in session.execute(query)]


def pairs_by_ids(session: Session, ids: Sequence[int]) -> list[Pair]:
    """The pairs, each with the chosen text a dataset uses: a reviewer's latest edit where there is
    one. The edit is set as the loaded value, never written: the stored pair keeps its own text."""
    rows = session.execute(
        select(Pair, PairReview.chosen_text)
        .outerjoin(PairReview, (PairReview.pair_id == Pair.id) & PairReview.latest)
        .where(Pair.id.in_(ids))
        .order_by(Pair.id)
    )
    pairs = []
    for pair, edited in rows:
        if edited is not None:
            set_committed_value(pair, "chosen", edited)
        pairs.append(pair)
    return pairs


def pairs_total(session: Session, *, prompts_done: int) -> dict[str, int]:
    """Pairs stored and flagged, without counting the whole table: a done prompt has exactly one
    pair (`prompts_done` from `jobs.queue_depth`, which a scrape has counted already), an import
    records how many it added, and flagged pairs have an index of their own."""
    imported = session.scalar(select(func.coalesce(func.sum(DatasetImport.n_pairs), 0)))
    flagged = session.scalar(select(func.count()).where(Pair.flagged))
    return {"total": prompts_done + imported, "flagged": flagged}


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


def export_provenance(
    session: Session, f: PairFilter, *, versions: Iterable[str], job_ids: Iterable[int]
) -> dict[str, Any]:
    """What a dataset card says of how the exported pairs were made: the constitution versions
    (full text), the generation jobs (mode, revisions, sampling), and the quality flags among the
    pairs the filter matches with flagged pairs included (what a default export leaves out)."""
    constitutions = [
        {"name": name, "version": content_hash, "body": body}
        for name, content_hash, body in session.execute(
            select(ConstitutionVersion.name, ConstitutionVersion.content_hash, ConstitutionVersion.body)
            .where(ConstitutionVersion.content_hash.in_(sorted(set(versions))))
            .order_by(ConstitutionVersion.id)
        )
    ]
    jobs = [
        {
            "job_id": job.id,
            "model": job.model,
            "mode": (job.options or {}).get("mode", "revise"),
            "revisions": job.revisions,
            "sampling": job.sampling,
        }
        for job in session.scalars(
            select(GenerationJob).where(GenerationJob.id.in_(sorted(set(job_ids)))).order_by(GenerationJob.id)
        )
    ]
    with_flagged = f.model_copy(update={"include_flagged": True, "flag": None})
    flagged = filtered(select(func.unnest(Pair.flags).label("flag")), with_flagged).subquery()
    flags = dict(session.execute(select(flagged.c.flag, func.count()).group_by(flagged.c.flag)).all())
    return {"constitutions": constitutions, "jobs": jobs, "flag_counts": flags}


def pair_prompt_margins(
    session: Session, f: PairFilter
) -> list[tuple[int, list[dict[str, str]], float | None]]:
    """(id, prompt, margin) of the pairs the filter selects, in id order: what `dedup=prompt` needs."""
    query = filtered(select(Pair.id, Pair.prompt, Pair.margin), f).order_by(Pair.id)
    return [(pair_id, prompt, margin) for pair_id, prompt, margin in session.execute(query)]


def flag_pairs(session: Session, ids: Sequence[int], flag: str) -> int:
    """Add `flag` to the pairs that do not carry it yet; how many did not."""
    if not ids:
        return 0
    result = session.execute(
        update(Pair)
        .where(Pair.id.in_(list(ids)), ~Pair.flags.any(flag))
        .values(flags=func.array_append(Pair.flags, flag))
    )
    return result.rowcount
