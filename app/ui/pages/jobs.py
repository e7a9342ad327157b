"""The jobs pages: every job with its progress, live; the submit form (pasted prompts or a file);
a job's page with its failed prompts, Retry and Cancel."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile

from app.access import CONSOLE_FORMS, access
from app.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.schemas import JobOut
from app.ui.forms import ACTION_ERRORS, ConsoleError, FormDep, act, errors_fragment, given, text_field
from app.ui.render import PAGE_SIZE, go, list_page, page
from app.views import jobs_out
from cai_dpo.core import services
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.requests import GenerateRequest
from cai_dpo.core.settings import Settings

OPEN_JOB_STATES = {"queued", "running", "cancelling"}

router = APIRouter()


@router.get("/jobs")
@access("read")
def jobs_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    before: DbId | None = None,
):
    jobs = jobs_out(
        session,
        job_queries.list_jobs(session, limit=PAGE_SIZE, before_id=before),
        gpu_hour_cost=settings.gpu_hour_cost,
    )
    return list_page(
        request,
        "jobs.html",
        "jobs",
        jobs,
        OPEN_JOB_STATES,
        before=before,
        constitutions=store.names(),
        settings=settings,
        idempotency_key=uuid.uuid4().hex,
    )


def read_prompt_file(upload: UploadFile, data: bytes) -> list[Any]:
    """Prompts of an uploaded .txt (one a line) or .jsonl/.json (strings, message lists, or objects
    with `prompt` or `messages`), as the CLI reads them."""
    name = upload.filename or "upload"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConsoleError(400, "file", f"{name} is not UTF-8 text ({exc.reason})") from None
    if name.endswith(".txt"):
        return [line for line in text.splitlines() if line.strip()]
    try:
        if name.endswith(".json"):
            items = json.loads(text)
            numbered = list(enumerate(items if isinstance(items, list) else [items], 1))
        else:
            numbered = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as exc:
        raise ConsoleError(422, "file", f"{name}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    except RecursionError:  # brackets nested deeper than the parser's stack
        raise ConsoleError(422, "file", f"{name}: JSON nested too deeply") from None
    prompts = []
    for n, item in numbered:
        if isinstance(item, dict):
            item = item.get("prompt", item.get("messages"))
        if not isinstance(item, str | list):
            raise ConsoleError(
                422,
                "file",
                f"{name}: line {n}: expected a string, a message list, or an object with 'prompt'",
            )
        prompts.append(item)
    return prompts


def generate_body(form: FormData, prompts: list[Any]) -> dict[str, Any]:
    """The `POST /generate` body the submit form stands for."""
    body: dict[str, Any] = {
        "prompts": prompts,
        **given(form, "constitution", "revisions", "model", "max_generated_tokens"),
    }
    mode = text_field(form, "mode") or "revise"
    body["mode"] = mode
    scorer = {"kind": text_field(form, "scorer_kind") or "judge", **given(form, "scorer_model")}
    if "scorer_model" in scorer:
        scorer["model"] = scorer.pop("scorer_model")
    if mode == "revise":
        if text_field(form, "verify"):
            body["verify"] = {"scorer": scorer}
    else:
        body |= given(form, "n")
        body["scorer"] = scorer
    sampling = given(form, "temperature", "top_p", "max_tokens", "seed")
    if sampling:
        body["sampling"] = sampling
    return body


@router.post("/generate")
@access("generate", accepts=CONSOLE_FORMS)
def submit_job(request: Request, form: FormDep, session: SessionDep):
    prompts: list[Any] = [line for line in text_field(form, "prompts").splitlines() if line.strip()]
    key = text_field(form, "idempotency_key") or None
    try:
        upload = form.get("file")
        if isinstance(upload, UploadFile) and upload.filename:
            prompts += read_prompt_file(upload, upload.file.read())
        if not prompts:
            raise ConsoleError(422, "prompts", "paste prompts or choose a file")
        body = GenerateRequest.model_validate(generate_body(form, prompts), strict=False)  # a form's text
        submitted = act(
            session,
            lambda: services.submit_generation_job(
                session,
                body=body,
                caller=request.state.caller,
                settings=request.app.state.settings,
                store=request.app.state.constitutions,
                engine=request.app.state.engine,
                idempotency_key=key,
            ),
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("submit-result", exc)
    request.state.audit_ids = {"job_id": str(submitted.job.id)}
    return go(request, f"/ui/jobs/{submitted.job.id}")


@router.get("/jobs/{job_id}")
@access("read")
def job_page(
    request: Request, job_id: DbId, session: SessionDep, settings: SettingsDep, cursor: int | None = None
):
    job = _job_or_404(session, job_id, settings)
    failed = job_queries.list_job_prompts(session, job_id, status="failed", after_id=cursor, limit=PAGE_SIZE)
    return page(
        request,
        "job.html",
        job=job,
        live=job.status in OPEN_JOB_STATES,
        failed=failed,
        next_cursor=failed[-1][0].id if len(failed) == PAGE_SIZE else None,
    )


def _job_or_404(session: Session, job_id: int, settings: Settings) -> JobOut:
    job = job_queries.get_job(session, job_id)
    if job is None:
        raise ConsoleError(404, "job_id", f"no job {job_id}")
    return jobs_out(session, [job], gpu_hour_cost=settings.gpu_hour_cost)[0]


@router.post("/jobs/{job_id}/retry")
@access("generate", accepts=CONSOLE_FORMS)
def retry_job(request: Request, job_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    return _job_action(
        request, session, job_id, lambda: services.retry_generation_job(session, job_id, caller)
    )


@router.post("/jobs/{job_id}/cancel")
@access("generate", accepts=CONSOLE_FORMS)
def cancel_job(request: Request, job_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    return _job_action(
        request, session, job_id, lambda: services.cancel_generation_job(session, job_id, caller)
    )


def _job_action(request: Request, session: Session, job_id: int, action: Callable[[], Any]) -> Response:
    try:
        act(session, action)
    except ACTION_ERRORS as exc:
        return errors_fragment("job-action", exc)
    return go(request, f"/ui/jobs/{job_id}")
