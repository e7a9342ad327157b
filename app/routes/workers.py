"""`GET /workers`: live workers with their model, trajectories in flight and tokens/s."""

from fastapi import APIRouter

from app import queries
from app.deps import Authorized, SessionDep, SettingsDep
from app.schemas import WorkerOut

router = APIRouter(prefix="/workers", tags=["workers"], dependencies=[Authorized])


@router.get("", response_model=list[WorkerOut])
def list_workers(session: SessionDep, settings: SettingsDep):
    return [
        WorkerOut.model_validate(w, from_attributes=True)
        for w in queries.live_workers(session, seen_seconds=settings.worker_seen_seconds)
    ]
