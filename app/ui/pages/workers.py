"""The workers page: live workers, their model, load and health."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request

from app.access import access
from app.deps import SessionDep, SettingsDep
from app.ui.render import page
from app.views import workers_out
from cai_dpo.core.queries import workers as worker_queries

router = APIRouter()


@router.get("/workers")
@access("read")
def workers_page(request: Request, session: SessionDep, settings: SettingsDep):
    workers = workers_out(worker_queries.live_workers(session, seen_seconds=settings.worker_seen_seconds))
    now = datetime.now(UTC)
    return page(request, "workers.html", workers=workers, now=now)
