"""FastAPI dependencies as type aliases: a route's signature says everything it needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from cai_dpo.core.api_keys import ApiKey
from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.db import session_scope
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


def get_caller(request: Request) -> ApiKey:
    """The API key of this request, as the Guard middleware authenticated it."""
    return request.state.caller


CallerDep = Annotated[ApiKey, Depends(get_caller)]


def or_404(row: T | None, message: str) -> T:
    """The row, or a 404 whose message names the path parameter that found nothing."""
    if row is None:
        raise HTTPException(status_code=404, detail=message)
    return row
