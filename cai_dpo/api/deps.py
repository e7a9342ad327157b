"""FastAPI dependencies as type aliases: a route's signature says everything it needs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from cai_dpo.api.schemas import FieldError
from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.db import session_scope
from cai_dpo.core.model_sources import ModelNotFound, check_model_name
from cai_dpo.core.settings import Settings

T = TypeVar("T")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.engine) as session:
        yield session


def get_store(request: Request) -> ConstitutionStore:
    return request.app.state.constitutions


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# scope="function": the transaction commits before the response is sent, so a client that got
# 202 can read what it created.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[ConstitutionStore, Depends(get_store)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With keys configured, every request needs `Authorization: Bearer <key>`."""
    keys = settings.api_key_list
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Compare against every key without an early exit, so timing says nothing about which matched.
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(token.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise HTTPException(
            status_code=401,
            detail="authorization: missing or invalid API key (send `Authorization: Bearer <key>`)",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = Depends(require_api_key)


def checked_model(session: Session, settings: Settings, model: str | None, *, field: str) -> str:
    """A model name a job may use, or a 422 naming the request's field."""
    try:
        return check_model_name(session, model, settings)
    except ModelNotFound as exc:
        raise FieldError(field, str(exc)) from None


def or_404(row: T | None, message: str) -> T:
    """The row, or a 404 whose message names the path parameter that found nothing."""
    if row is None:
        raise HTTPException(status_code=404, detail=message)
    return row
