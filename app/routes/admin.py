"""Administration: the audit log of mutating calls and the API keys in force (names and scopes)."""

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from app.access import access
from app.deps import SessionDep
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import audit as audit_queries
from cai_dpo.core.storable import StorableText

router = APIRouter(tags=["admin"])


class AuditOut(BaseModel):
    id: int
    at: str
    key_name: str | None
    method: str
    route: str
    status: int
    ids: dict[str, str]


class KeyOut(BaseModel):
    name: str
    scopes: list[str]


@router.get("/audit", response_model=list[AuditOut])
@access("admin")
def audit_log(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[DbId | None, Query(description="Only entries with a smaller id (paging).")] = None,
    key_name: Annotated[StorableText | None, Query(max_length=64)] = None,
):
    """Mutating calls, newest first: who (key name), what (method, route), on which ids, and the outcome."""
    return [
        AuditOut(
            id=e.id,
            at=e.at.isoformat(),
            key_name=e.key_name,
            method=e.method,
            route=e.route,
            status=e.status,
            ids={k: str(v) for k, v in e.ids.items()},
        )
        for e in audit_queries.recent(session, limit=limit, before_id=before, key_name=key_name)
    ]


@router.get("/keys", response_model=list[KeyOut])
@access("admin")
def api_keys(request: Request):
    """The keys in force (never their secrets)."""
    return [KeyOut(name=k.name, scopes=sorted(k.scopes)) for k in request.app.state.keys.current()]
