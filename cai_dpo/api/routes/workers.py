"""`GET /workers`: live workers with their model, trajectories in flight and tokens/s."""

from fastapi import APIRouter

from cai_dpo.api.deps import Authorized, SessionDep, SettingsDep
from cai_dpo.api.schemas import WorkerOut
from cai_dpo.core.queries import workers as worker_queries

router = APIRouter(prefix="/workers", tags=["workers"], dependencies=[Authorized])


@router.get("", response_model=list[WorkerOut])
def list_workers(session: SessionDep, settings: SettingsDep):
    return [
        WorkerOut.model_validate(w, from_attributes=True)
        for w in worker_queries.live_workers(session, seen_seconds=settings.worker_seen_seconds)
    ]
