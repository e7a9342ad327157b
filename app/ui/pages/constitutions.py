"""The constitutions pages: the list; the YAML editor that checks as you type, saves with the
lost-update check, shows the versions used and their diffs; and "try it", one prompt through the
loop with the editor's unsaved text."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from app.access import CONSOLE_FORMS, access
from app.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.ui.forms import (
    ACTION_ERRORS,
    ConsoleError,
    FormDep,
    act,
    errors_fragment,
    int_field,
    refused,
    text_field,
)
from app.ui.pages.jobs import OPEN_JOB_STATES
from app.ui.pages.pairs import principles
from app.ui.render import fragment, page, templates
from app.ui.text_diff import line_diff
from app.views import jobs_out
from cai_dpo.core import services
from cai_dpo.core.constitutions import ConstitutionError, ConstitutionStore, check_name, content_hash
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import pairs as pair_queries

# A new constitution starts from this.
NEW_CONSTITUTION = """description: What this constitution asks of the answers.
revisions: 1
principle_sampling: random
principles:
  - id: first
    critique: Point out what is wrong with your last answer.
    revision: Rewrite your answer without it. Reply with only the rewritten answer itself.
"""

router = APIRouter()


@router.get("/constitutions")
@access("read")
def constitutions_page(request: Request, store: StoreDep, new: str | None = None):
    if new:  # the "new constitution" form: open the editor on that name
        try:
            return RedirectResponse(f"/ui/constitutions/{check_name(new.strip())}", status_code=303)
        except ConstitutionError as exc:
            raise ConsoleError(422, "new", exc.message) from None
    rows = []
    for name in store.names():
        try:
            constitution = store.get(name)
            rows.append(
                {"name": name, "version": constitution.version, "spec": constitution.spec, "error": None}
            )
        except ValueError:
            rows.append({"name": name, "version": None, "spec": None, "error": None})
        rows[-1]["error"] = store.error(name)
    return page(request, "constitutions.html", rows=rows)


def valid_name(name: str) -> str:
    """A constitution name from the path, or the console's 404 naming it."""
    try:
        return check_name(name)
    except ConstitutionError as exc:
        raise ConsoleError(404, "name", exc.message) from None


def _file_text(store: ConstitutionStore, name: str) -> str | None:
    try:
        return store.path_for(name).read_text()
    except FileNotFoundError:
        return None


@router.get("/constitutions/{name}")
@access("read")
def constitution_page(
    request: Request, name: str, session: SessionDep, store: StoreDep, version: str | None = None
):
    valid_name(name)
    on_disk = _file_text(store, name)
    text = on_disk if on_disk is not None else NEW_CONSTITUTION
    loaded = None
    if version:
        row = constitution_queries.find_version(session, name, version)
        if row is None:
            raise ConsoleError(404, "version", f"no version {version!r} of {name!r}")
        text, loaded = row.body, row.content_hash
    return page(
        request,
        "constitution.html",
        name=name,
        text=text,
        exists=on_disk is not None,
        if_match=content_hash(on_disk) if on_disk is not None else "",
        loaded=loaded,
        check=check_text(store, name, text),
        versions=_versions(session, store, name, on_disk),
        settings=request.app.state.settings,
    )


def _versions(
    session: Session, store: ConstitutionStore, name: str, on_disk: str | None
) -> list[dict[str, Any]]:
    """The versions used so far, newest first, with the file on disk marked (listed first if it
    was never used)."""
    versions = constitution_queries.constitution_versions(session, name)
    current = content_hash(on_disk) if on_disk is not None else None
    for v in versions:
        v["current"] = v["version"] == current
    if current is not None and not any(v["current"] for v in versions):
        versions.insert(0, {"version": current, "first_used_at": None, "n_pairs": 0, "current": True})
    return versions


def check_text(store: ConstitutionStore, name: str, text: str) -> dict[str, Any]:
    """The editor's text validated: ok, or the error with its field and line."""
    try:
        constitution = store.validate(name, text)
    except ConstitutionError as exc:
        return {"ok": False, "message": exc.message, "field": exc.field, "line": exc.line}
    return {"ok": True, "version": constitution.version, "n_principles": len(constitution.spec.principles)}


@router.post("/constitutions/{name}/check")
@access("read", accepts=CONSOLE_FORMS)
def check_constitution(request: Request, name: str, form: FormDep, store: StoreDep):
    result = check_text(store, valid_name(name), text_field(form, "body"))
    return fragment(templates.get_template("_check.html").render(check=result))


@router.post("/constitutions/{name}")
@access("admin", accepts=CONSOLE_FORMS)
def save_constitution(request: Request, name: str, form: FormDep, session: SessionDep, store: StoreDep):
    text = text_field(form, "body")
    if_match = text_field(form, "if_match") or None
    try:
        act(
            session,
            lambda: services.save_constitution(request.app.state.engine, store, name, text, if_match),
        )
    except ACTION_ERRORS as exc:
        status, lines = refused(exc)
        conflict = status == 409 and "if-match" in " ".join(lines)
        check = check_text(store, name, text) if status == 422 else None
        html = templates.get_template("_saved.html").render(
            ok=False, lines=lines, conflict=conflict, check=check, name=name, if_match=if_match
        )
        return fragment(html, status)
    on_disk = _file_text(store, name) or text
    html = templates.get_template("_saved.html").render(
        ok=True,
        name=name,
        version=content_hash(on_disk),
        check=check_text(store, name, text),
        versions=_versions(session, store, name, on_disk),
    )
    return fragment(html)


@router.get("/constitutions/{name}/diff")
@access("read")
def constitution_diff(request: Request, name: str, session: SessionDep, store: StoreDep, a: str, b: str):
    texts = []
    for which in (a, b):
        if which == "file":
            texts.append(_file_text(store, valid_name(name)) or "")
            continue
        row = constitution_queries.find_version(session, valid_name(name), which)
        if row is None:
            raise ConsoleError(404, "version", f"no version {which!r} of {name!r}")
        texts.append(row.body)
    rows = line_diff(texts[0], texts[1])
    return fragment(templates.get_template("_line_diff.html").render(rows=rows, a=a, b=b))


@router.post("/constitutions/{name}/try")
@access("generate", accepts=CONSOLE_FORMS)
def try_constitution(
    request: Request,
    name: str,
    form: FormDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
):
    """One prompt through the loop with the editor's (unsaved) text (`services.submit_try_job`)."""
    try:
        given_rounds = text_field(form, "revisions").strip()
        revisions = int_field(form, "revisions", 1, 1, settings.max_revisions) if given_rounds else None
        job = act(
            session,
            lambda: services.submit_try_job(
                session,
                name=name,
                text=text_field(form, "body"),
                prompt=text_field(form, "prompt"),
                revisions=revisions,
                max_tokens=int_field(form, "max_tokens", 128, 1, 8192),
                caller=caller,
                settings=settings,
                store=store,
            ),
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("try-result", exc)
    request.state.audit_ids = {"job_id": str(job.id)}
    return try_result(request, name, job.id, session)


@router.get("/constitutions/{name}/try/{job_id}")
@access("read")
def try_result(request: Request, name: str, job_id: DbId, session: SessionDep):
    job = job_queries.get_job(session, job_id)
    if job is None or (job.job_metadata or {}).get("console_try") != name:
        raise ConsoleError(404, "job_id", f"no try of {name!r} with job {job_id}")
    state = jobs_out(session, [job], gpu_hour_cost=request.app.state.settings.gpu_hour_cost)[0]
    prompts = job_queries.list_job_prompts(session, job_id, status=None, after_id=None, limit=1)
    prompt, pair_id = prompts[0] if prompts else (None, None)
    pair = pair_queries.get_pair(session, pair_id)[0] if pair_id else None
    html = templates.get_template("_try.html").render(
        name=name,
        job=state,
        prompt=prompt,
        pair=pair,
        trajectory=(pair.trajectory if pair else {}),
        principles=principles(session, job.constitution_version_id),
        live=state.status in OPEN_JOB_STATES,
    )
    return fragment(html)
