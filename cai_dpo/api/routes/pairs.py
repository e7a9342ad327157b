"""Pairs: browse with the filters of `/export` and cursor paging; one pair with its whole trajectory."""

from typing import Annotated

from fastapi import APIRouter, Query

from cai_dpo.api.deps import SessionDep, SettingsDep, or_404
from cai_dpo.api.schemas import PairOut, PairPage, PairPageQuery
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.tables import Pair

router = APIRouter(prefix="/pairs", tags=["pairs"])


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
        scores=pair.scores,
        preference=pair.preference,
        margin=pair.margin,
        metadata=pair.pair_metadata,
    )


@router.get("", response_model=PairPage)
def list_pairs(session: SessionDep, settings: SettingsDep, query: Annotated[PairPageQuery, Query()]):
    limit = min(query.limit, settings.page_size_max)
    after = int(query.cursor) if query.cursor else None
    rows = pair_queries.list_pairs(session, query.only_filter(), after_id=after, limit=limit)
    items = [pair_out(pair, version, detail=False) for pair, version in rows]
    return PairPage(items=items, next_cursor=str(items[-1].id) if len(items) == limit else None)


@router.get("/{pair_id}", response_model=PairOut)
def get_pair(pair_id: DbId, session: SessionDep):
    found = or_404(pair_queries.get_pair(session, pair_id), f"pair_id: no pair {pair_id}")
    return pair_out(*found, detail=True)
