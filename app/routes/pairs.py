"""Pairs: browse with filters and cursor paging; one pair with its whole trajectory."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app import queries
from app.deps import Authorized, SessionDep, SettingsDep, or_404
from app.models import Pair
from app.schemas import Cursor, DbId, PairOut, PairPage, Text

router = APIRouter(prefix="/pairs", tags=["pairs"], dependencies=[Authorized])


def pair_filter(
    job_id: DbId | None = None,
    constitution: Annotated[Text | None, Query(max_length=64)] = None,
    constitution_version: Annotated[
        Text | None,
        Query(min_length=8, max_length=64, description="Content hash (or its first 8+ characters)."),
    ] = None,
    since: Annotated[datetime | None, Query(description="Pairs created at or after this ISO time.")] = None,
    include_flagged: bool = False,
    source: Annotated[
        Text | None, Query(max_length=200, description="`generated`, or the source tag of an import.")
    ] = None,
    import_id: DbId | None = None,
) -> queries.PairFilter:
    return queries.PairFilter(
        job_id=job_id,
        constitution=constitution,
        constitution_version=constitution_version,
        since=since,
        include_flagged=include_flagged,
        source=source,
        import_id=import_id,
    )


PairFilterDep = Annotated[queries.PairFilter, Depends(pair_filter)]


def pair_out(pair: Pair, version: str | None, *, detail: bool) -> PairOut:
    return PairOut(
        id=pair.id,
        job_id=pair.job_id,
        prompt_id=pair.prompt_id,
        source=pair.source,
        constitution=pair.constitution_name,
        constitution_version=version,
        prompt=pair.prompt,
        chosen=pair.chosen,
        rejected=pair.rejected,
        flags=pair.flags,
        model=pair.model,
        created_at=pair.created_at,
        principles=pair.trajectory.get("principles", []),
        trajectory=pair.trajectory if detail else None,
        sampling=pair.sampling if detail else None,
        usage=pair.usage if detail else None,
        metadata=pair.pair_metadata,
    )


@router.get("", response_model=PairPage)
def list_pairs(
    session: SessionDep,
    settings: SettingsDep,
    filters: PairFilterDep,
    cursor: Cursor | None = None,
    limit: Annotated[int, Query(ge=1)] = 50,
):
    limit = min(limit, settings.page_size_max)
    rows = queries.list_pairs(session, filters, after_id=int(cursor) if cursor else None, limit=limit)
    items = [pair_out(pair, version, detail=False) for pair, version in rows]
    return PairPage(items=items, next_cursor=str(items[-1].id) if len(items) == limit else None)


@router.get("/{pair_id}", response_model=PairOut)
def get_pair(pair_id: DbId, session: SessionDep):
    return pair_out(*or_404(queries.get_pair(session, pair_id), f"pair_id: no pair {pair_id}"), detail=True)
