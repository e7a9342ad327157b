"""`/health` (no auth: database reachable, workers seen recently) and `/metrics` (Prometheus text)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from cai_dpo.api.deps import Authorized, SettingsDep
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import workers as worker_queries

router = APIRouter(tags=["health"])


@router.get("/health")
def health(request: Request, settings: SettingsDep) -> JSONResponse:
    try:
        with session_scope(request.app.state.engine) as session:
            session.execute(text("SELECT 1"))
            live = worker_queries.live_workers(session, seen_seconds=settings.worker_seen_seconds)
    except Exception as exc:  # noqa: BLE001 - health reports any database failure as such
        return JSONResponse(
            status_code=503, content={"status": "error", "database": False, "error": str(exc)[:500]}
        )
    workers = {"generate": 0, "train": 0}
    for worker in live:
        workers[worker.kind] = workers.get(worker.kind, 0) + 1
    return JSONResponse({"status": "ok", "database": True, "workers": workers})


@router.get("/metrics", dependencies=[Authorized], response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition."""
    return PlainTextResponse(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
