"""Pairs: browse with the filters of `/export` and cursor paging; one pair with its whole trajectory
and its human reviews; review it."""

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app import views
from app.access import access
from app.deps import CallerDep, SessionDep, SettingsDep, or_404
from app.openapi import errors
from app.schemas import PairOut, PairPage, PairPageQuery
from app.views import pair_out
from cai_dpo.core import services
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import reviews as review_queries
from cai_dpo.core.requests import ReviewIn

router = APIRouter(prefix="/pairs", tags=["pairs"])


@router.get("", response_model=PairPage)
@access("read")
def list_pairs(session: SessionDep, settings: SettingsDep, query: Annotated[PairPageQuery, Query()]):
    limit = min(query.limit, settings.page_size_max)
    after = int(query.cursor) if query.cursor else None
    rows = pair_queries.list_pairs(session, query.only_filter(), after_id=after, limit=limit)
    reviews = review_queries.latest_reviews(session, [pair.id for pair, _ in rows])
    items = [pair_out(pair, version, detail=False, review=reviews.get(pair.id)) for pair, version in rows]
    return PairPage(items=items, next_cursor=str(items[-1].id) if len(items) == limit else None)


@router.get("/{pair_id}", response_model=PairOut, responses=errors(404))
@access("read")
def get_pair(pair_id: DbId, session: SessionDep):
    return or_404(views.pair_detail(session, pair_id), f"pair_id: no pair {pair_id}")


@router.post(
    "/{pair_id}/review",
    status_code=201,
    response_model=PairOut,
    responses=errors(404),
    openapi_extra={"requestBody": {"required": True}},  # None is refused with its own message
)
@access("review")
def review_pair(
    pair_id: DbId, request: Request, session: SessionDep, caller: CallerDep, body: ReviewIn | None = None
):
    """Approve or reject the pair, or approve it with an edited chosen answer: a new review version
    recorded with the key's name and the time. The generated text is never overwritten."""
    review = services.review_pair(session, pair_id=pair_id, body=body, reviewer=caller)
    request.state.audit_ids = {"review_version": str(review.version)}
    return views.pair_detail(session, pair_id)
