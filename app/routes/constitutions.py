"""Constitutions: list, read (with the versions used so far), replace as YAML, and restore a version."""

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request
from sqlalchemy.orm import Session

from app.access import YAML, access
from app.deps import SessionDep, StoreDep, or_404
from app.openapi import NAME, VERSION, errors, yaml_request
from app.schemas import ConstitutionOut, ConstitutionVersionOut
from cai_dpo.core import services
from cai_dpo.core.constitutions import (
    Constitution,
    ConstitutionStore,
    UnknownConstitution,
    check_name,
)
from cai_dpo.core.errors import FieldError
from cai_dpo.core.queries import constitutions as constitution_queries

router = APIRouter(prefix="/constitutions", tags=["constitutions"])

Name = Annotated[str, Path(description=NAME["description"], json_schema_extra={"pattern": NAME["pattern"]})]
Version = Annotated[
    str, Path(description=VERSION["description"], json_schema_extra={"pattern": VERSION["pattern"]})
]
IfMatch = Annotated[
    str | None,
    Header(
        pattern=r'^"?[0-9a-f]{64}"?$',
        description="The version (content hash) you edited: a save over another version is a 409.",
    ),
]


def _out(constitution: Constitution, store: ConstitutionStore, **extra) -> ConstitutionOut:
    error = store.error(constitution.name)
    return ConstitutionOut(
        name=constitution.name,
        version=constitution.version,
        description=constitution.spec.description,
        error=error.to_dict() if error else None,
        **extra,
    )


async def yaml_body(request: Request) -> str:
    """The raw request body (YAML, sent as application/yaml)."""
    try:
        return (await request.body()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FieldError("body", f"not UTF-8 text: {exc.reason} at byte {exc.start}", 400) from exc


def _current(store: ConstitutionStore, name: str) -> Constitution:
    try:
        return store.get(check_name(name))
    except UnknownConstitution as exc:  # a 404 names the path parameter, as every route's does
        raise FieldError("name", str(exc), 404) from None


@router.get("", response_model=list[ConstitutionOut])
@access("read")
def list_constitutions(store: StoreDep):
    out = []
    for name in store.names():
        try:
            out.append(_out(store.get(name), store))
        except ValueError:  # an invalid file with no good version yet: listed with its error
            error = store.error(name)
            out.append(
                ConstitutionOut(
                    name=name, version="", description="", error=error.to_dict() if error else None
                )
            )
    return out


def _detail(constitution: Constitution, store: ConstitutionStore, session: Session) -> ConstitutionOut:
    return _out(
        constitution,
        store,
        body=constitution.text,
        spec=constitution.spec.model_dump(mode="json"),
        versions=constitution_queries.constitution_versions(session, constitution.name),
    )


@router.get("/{name}", response_model=ConstitutionOut, responses=errors(404))
@access("read")
def get_constitution(name: Name, store: StoreDep, session: SessionDep):
    return _detail(_current(store, name), store, session)


@router.put(
    "/{name}",
    response_model=ConstitutionOut,
    responses=errors(409),
    openapi_extra=yaml_request("ConstitutionSpec"),
)
@access("admin", accepts=YAML, cap="constitution")
def put_constitution(
    name: Name,
    request: Request,
    store: StoreDep,
    session: SessionDep,
    body: Annotated[str, Depends(yaml_body)],
    if_match: IfMatch = None,
):
    """Replace the constitution's file with a YAML body (validated first; nothing changes if invalid)."""
    return _detail(
        services.save_constitution(request.app.state.engine, store, name, body, if_match), store, session
    )


@router.get("/{name}/versions/{version}", response_model=ConstitutionVersionOut, responses=errors(404))
@access("read")
def get_version(name: Name, version: Version, session: SessionDep):
    """One version used so far (its exact text), by content hash or a prefix of 8+ characters."""
    row = or_404(
        constitution_queries.find_version(session, check_name(name), version),
        f"version: no version {version!r} of {name!r}",
    )
    return ConstitutionVersionOut(
        name=row.name, version=row.content_hash, body=row.body, first_used_at=row.created_at
    )


@router.post("/{name}/versions/{version}/restore", response_model=ConstitutionOut, responses=errors(404, 409))
@access("admin")
def restore_version(
    name: Name,
    version: Version,
    request: Request,
    store: StoreDep,
    session: SessionDep,
    if_match: IfMatch = None,
):
    """Make an earlier version the current file again (a new save of its exact text)."""
    row = or_404(
        constitution_queries.find_version(session, check_name(name), version),
        f"version: no version {version!r} of {name!r}",
    )
    return _detail(
        services.save_constitution(request.app.state.engine, store, name, row.body, if_match), store, session
    )
