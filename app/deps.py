"""FastAPI dependencies as type aliases: a route's signature says everything it needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from app.schemas import FieldError
from cai_dpo.core.api_keys import ApiKey
from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.db import session_scope
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.model_sources import ModelNotFound, check_model_name, local_model_folder
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


def require_owner_or_admin(caller: ApiKey, owner: str | None, what: str) -> None:
    """A `generate`/`train` key acts on its own jobs; `admin` on any."""
    if not caller.allows("admin") and owner is not None and owner != caller.name:
        raise HTTPException(
            403, f"authorization: {what} belongs to key {owner!r}; key {caller.name!r} lacks admin"
        )


def checked_model(session: Session, settings: Settings, model: str | None, *, field: str) -> str:
    """A model name a job may use, or a 404 naming the request's field: what a model reference may
    look like is `ModelRef`'s (a 422 while the body is read); whether it exists is this check's."""
    try:
        return check_model_name(session, model, settings)
    except ModelNotFound as exc:
        raise FieldError(field, str(exc), 404) from None


def checked_scorer_model(session: Session, settings: Settings, spec: ScorerSpec, *, field: str) -> None:
    """A scorer's model exists: a judge's is a model a job may use, a reward model is a local
    Hugging Face folder, an implicit scorer a finished training job."""
    try:
        if spec.kind == "reward_model":
            local_model_folder(spec.model or "")
        else:
            check_model_name(session, spec.model, settings)
    except ModelNotFound as exc:
        raise FieldError(field, str(exc), 404) from None


def or_404(row: T | None, message: str) -> T:
    """The row, or a 404 whose message names the path parameter that found nothing."""
    if row is None:
        raise HTTPException(status_code=404, detail=message)
    return row
