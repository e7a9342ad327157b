"""Constitutions: list, read (with the versions used so far) and replace as YAML."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from cai_dpo.api.deps import Authorized, SessionDep, StoreDep
from cai_dpo.api.schemas import ConstitutionOut, FieldError
from cai_dpo.core.constitutions import Constitution, check_name
from cai_dpo.core.queries import constitutions as constitution_queries

router = APIRouter(prefix="/constitutions", tags=["constitutions"], dependencies=[Authorized])


def _out(constitution: Constitution, store, **extra) -> ConstitutionOut:
    error = store.error(constitution.name)
    return ConstitutionOut(
        name=constitution.name,
        version=constitution.version,
        description=constitution.spec.description,
        error=error.to_dict() if error else None,
        **extra,
    )


async def yaml_body(request: Request) -> str:
    """The raw request body (YAML, sent as application/yaml or text/plain)."""
    try:
        return (await request.body()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FieldError("body", f"not UTF-8 text: {exc}", 400) from exc


@router.get("", response_model=list[ConstitutionOut])
def list_constitutions(store: StoreDep):
    out = []
    for name in store.names():
        try:
            out.append(_out(store.get(name), store))
        except ValueError as exc:  # an invalid file with no good version yet: listed with its error
            out.append(ConstitutionOut(name=name, version="", description="", error={"message": str(exc)}))
    return out


def _detail(constitution: Constitution, store, session) -> ConstitutionOut:
    return _out(
        constitution,
        store,
        body=constitution.text,
        spec=constitution.spec.model_dump(mode="json"),
        versions=constitution_queries.constitution_versions(session, constitution.name),
    )


@router.get("/{name}", response_model=ConstitutionOut)
def get_constitution(name: str, store: StoreDep, session: SessionDep):
    return _detail(store.get(check_name(name)), store, session)


@router.put("/{name}", response_model=ConstitutionOut)
def put_constitution(
    name: str,
    store: StoreDep,
    session: SessionDep,
    body: Annotated[str, Depends(yaml_body)],
):
    constitution = store.put(check_name(name), body)
    constitution_queries.store_constitution_version(session, constitution)
    return _detail(constitution, store, session)
