"""The pairs pages: the list under the filters of `/export`, paged both ways; a pair with its diff,
trajectory and reviews, reviewed from the keyboard."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.access import CONSOLE_FORMS, access
from app.deps import CallerDep, SessionDep, StoreDep
from app.ui.forms import ACTION_ERRORS, ConsoleError, FormDep, act, errors_fragment, given, refused
from app.ui.render import PAGE_SIZE, is_htmx, page
from app.ui.text_diff import diff_stats, word_diff
from cai_dpo.core import services
from cai_dpo.core.pair_filter import DbId, PairFilter
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import reviews as review_queries
from cai_dpo.core.requests import ReviewIn

router = APIRouter()

FILTER_FIELDS = tuple(PairFilter.model_fields)


def pair_filter_from(query: dict[str, str]) -> tuple[PairFilter, list[str], dict[str, str]]:
    """The filter the query names (blank fields left out), its errors, and the fields as given."""
    values = {name: query[name].strip() for name in FILTER_FIELDS if query.get(name, "").strip()}
    if values.get("include_flagged") == "on":
        values["include_flagged"] = "true"
    try:
        return PairFilter.model_validate(values, strict=False), [], values
    except ValidationError as exc:
        return PairFilter(), refused(exc)[1], values


@router.get("/pairs")
@access("read")
def pairs_page(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    after: DbId | None = None,
    before: DbId | None = None,
):
    f, errors, values = pair_filter_from(dict(request.query_params))
    rows = (
        []
        if errors
        else pair_queries.list_pairs(session, f, after_id=after, before_id=before, limit=PAGE_SIZE)
    )
    reviews = review_queries.latest_reviews(session, [pair.id for pair, _ in rows])
    query = urlencode(values)
    first_id, last_id = (rows[0][0].id, rows[-1][0].id) if rows else (None, None)
    has_older = first_id is not None and pair_queries.previous_id(session, f, first_id) is not None
    has_newer = last_id is not None and pair_queries.next_id(session, f, last_id) is not None
    return page(
        request,
        "pairs.html",
        rows=rows,
        reviews=reviews,
        errors=errors,
        values=values,
        query=query,
        prev_url=f"/ui/pairs?{urlencode(values | {'before': first_id})}" if has_older else None,
        next_url=f"/ui/pairs?{urlencode(values | {'after': last_id})}" if has_newer else None,
        constitutions=store.names(),
    )


def principles(session: Session, version_id: int | None) -> dict[str, dict[str, str]]:
    """Principle id -> its critique and revision requests, in the version the pair was made with."""
    version = constitution_queries.get_constitution_version(session, version_id) if version_id else None
    return {p["id"]: p for p in (version.spec.get("principles", []) if version else [])}


def pair_context(session: Session, pair_id: int, f: PairFilter) -> dict[str, Any]:
    found = pair_queries.get_pair(session, pair_id)
    if found is None:
        raise ConsoleError(404, "pair_id", f"no pair {pair_id}")
    pair, version = found
    history = review_queries.history(session, pair_id)
    latest = history[-1] if history else None
    chosen = latest["chosen"] if latest and latest["chosen"] is not None else pair.chosen
    segments = word_diff(pair.rejected, chosen)
    before, after = pair_queries.previous_id(session, f, pair_id), pair_queries.next_id(session, f, pair_id)
    return {
        "pair": pair,
        "version": version,
        "history": list(reversed(history)),
        "latest": latest,
        "chosen": chosen,
        "diff": segments,
        "diff_stats": diff_stats(segments) if segments is not None else None,
        "principles": principles(session, pair.constitution_version_id),
        "trajectory": pair.trajectory or {},
        "before_id": before,
        "after_id": after,
    }


@router.get("/pairs/{pair_id}")
@access("read")
def pair_page(request: Request, pair_id: DbId, session: SessionDep):
    f, _, values = pair_filter_from(dict(request.query_params))
    context = pair_context(session, pair_id, f)
    return page(request, "pair.html", query=urlencode(values), filter_values=values, **context)


@router.post("/pairs/{pair_id}/review")
@access("review", accepts=CONSOLE_FORMS)
def review_pair(request: Request, pair_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    f, _, values = pair_filter_from({k: v for k, v in form.items() if isinstance(v, str)})
    try:
        body = ReviewIn.model_validate(
            given(form, "status") | {"chosen": form.get("chosen") or None}, strict=False
        )
        review = act(
            session, lambda: services.review_pair(session, pair_id=pair_id, body=body, reviewer=caller)
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("review-result", exc)
    request.state.audit_ids = {"review_version": str(review.version)}
    query = urlencode(values)
    if not is_htmx(request):
        return RedirectResponse(f"/ui/pairs/{pair_id}?{query}", status_code=303)
    return page(request, "pair.html", query=query, filter_values=values, **pair_context(session, pair_id, f))
