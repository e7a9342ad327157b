"""`/health` (no auth: database reachable, workers seen recently) and `/metrics` (Prometheus text)."""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.access import access
from app.deps import SettingsDep
from app.schemas import HealthOut
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import workers as worker_queries

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "The database cannot be reached."}},
)
@access(None)
def health(request: Request, settings: SettingsDep) -> JSONResponse:
    """`ok`, `degraded` (a live worker reports a problem, e.g. its engine is down, or work waits
    with no live worker of its kind) or `error` (no database). The problems' text is shown only to
    callers with a valid key."""
    caller = getattr(request.state, "caller", None)
    detailed = caller is not None and caller.allows("read")
    try:
        with session_scope(request.app.state.engine) as session:
            session.execute(text("SELECT 1"))
            live = worker_queries.live_workers(session, seen_seconds=settings.worker_seen_seconds)
            pending = worker_queries.pending_work(session)
    except Exception as exc:  # noqa: BLE001 - health reports any database failure as such
        log.warning("health: database unreachable: %s", exc)
        body = {"status": "error", "database": False}
        return JSONResponse(status_code=503, content=body | ({"error": str(exc)[:500]} if detailed else {}))
    workers = {"generate": 0, "train": 0}
    problems = []
    for worker in live:
        workers[worker.kind] = workers.get(worker.kind, 0) + 1
        if problem := (worker.stats or {}).get("problem"):
            problems.append({"worker": worker.id, "kind": worker.kind, "problem": problem})
    # Work waiting and nobody to do it (a worker crashed for good, or never started): not ok.
    for kind, waiting in pending.items():
        if waiting and not workers.get(kind):
            problems.append(
                {"worker": None, "kind": kind, "problem": f"work is waiting and no {kind} worker is live"}
            )
    body = {"status": "degraded" if problems else "ok", "database": True, "workers": workers}
    if problems:
        body["unhealthy_workers"] = sum(p["worker"] is not None for p in problems)
        if detailed:
            body["problems"] = problems
    return JSONResponse(body)


@router.get("/metrics", response_class=PlainTextResponse)
@access("read")
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition."""
    return PlainTextResponse(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
