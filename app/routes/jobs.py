"""Generation jobs: `POST /generate` queues prompts; `/jobs` shows progress and cancels."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from app.access import access
from app.deps import (
    CallerDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    or_404,
)
from app.openapi import errors
from app.schemas import Cursor, GenerateResponse, JobOut, PromptPage
from app.views import jobs_out, prompt_out
from cai_dpo.core import services
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.requests import GenerateRequest

router = APIRouter(tags=["generation"])


@router.post("/generate", status_code=202, response_model=GenerateResponse, responses=errors(404, 409))
@access("generate")
def generate(
    body: GenerateRequest,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    submitted = services.submit_generation_job(
        session,
        body=body,
        caller=caller,
        settings=settings,
        store=store,
        engine=request.app.state.engine,
        idempotency_key=idempotency_key,
    )
    request.state.audit_ids = {"job_id": str(submitted.job.id)}
    return GenerateResponse(
        job_id=submitted.job.id,
        n_prompts=submitted.job.n_prompts,
        constitution_version=submitted.constitution_version,
    )


@router.get("/jobs", response_model=list[JobOut])
@access("read")
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[DbId | None, Query(description="Only jobs with a smaller id (paging).")] = None,
):
    return jobs_out(
        session,
        job_queries.list_jobs(session, limit=limit, before_id=before),
        gpu_hour_cost=settings.gpu_hour_cost,
    )


@router.get("/jobs/{job_id}", response_model=JobOut, responses=errors(404))
@access("read")
def get_job(job_id: DbId, session: SessionDep, settings: SettingsDep):
    job = or_404(job_queries.get_job(session, job_id), f"job_id: no job {job_id}")
    return jobs_out(session, [job], gpu_hour_cost=settings.gpu_hour_cost)[0]


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=errors(404))
@access("generate")
def cancel_job(job_id: DbId, session: SessionDep, settings: SettingsDep, caller: CallerDep):
    job = services.cancel_generation_job(session, job_id, caller)
    return jobs_out(session, [job], gpu_hour_cost=settings.gpu_hour_cost)[0]


@router.get("/jobs/{job_id}/prompts", response_model=PromptPage, responses=errors(404))
@access("read")
def list_job_prompts(
    job_id: DbId,
    session: SessionDep,
    settings: SettingsDep,
    status: job_queries.PromptStatus | None = None,
    cursor: Cursor | None = None,
    limit: Annotated[int, Query(ge=1)] = 50,
):
    """The job's prompts with their state: `status=failed` shows what failed and why; a done
    prompt's `flags` are its pair's (`no_harm_found`: nothing to critique, its answer kept)."""
    or_404(job_queries.get_job(session, job_id), f"job_id: no job {job_id}")
    limit = min(limit, settings.page_size_max)
    rows = job_queries.list_job_prompts(
        session, job_id, status=status, after_id=int(cursor) if cursor else None, limit=limit
    )
    flags = job_queries.pair_flags(session, [pair_id for _, pair_id in rows if pair_id is not None])
    items = [prompt_out(prompt, pair_id, flags.get(pair_id)) for prompt, pair_id in rows]
    return PromptPage(items=items, next_cursor=str(items[-1].id) if len(items) == limit else None)


@router.post("/jobs/{job_id}/retry", response_model=JobOut, responses=errors(404, 409))
@access("generate")
def retry_job(job_id: DbId, session: SessionDep, settings: SettingsDep, caller: CallerDep):
    """Queue the job's failed prompts again (e.g. after a model or settings fix)."""
    job = services.retry_generation_job(session, job_id, caller)
    return jobs_out(session, [job], gpu_hour_cost=settings.gpu_hour_cost)[0]
