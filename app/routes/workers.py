"""`GET /workers`: live workers with their model, trajectories in flight and tokens/s."""

from fastapi import APIRouter

from app.access import access
from app.deps import SessionDep, SettingsDep
from app.schemas import WorkerOut
from app.views import workers_out
from cai_dpo.core.queries import workers as worker_queries

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("", response_model=list[WorkerOut])
@access("read")
def list_workers(session: SessionDep, settings: SettingsDep):
    return workers_out(worker_queries.live_workers(session, seen_seconds=settings.worker_seen_seconds))
