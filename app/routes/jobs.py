"""Generation jobs: `POST /generate` queues prompts; `/jobs` shows progress and cancels."""

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from sqlalchemy.orm import Session

from app.access import access
from app.deps import (
    CallerDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    checked_model,
    checked_scorer_model,
    or_404,
    require_owner_or_admin,
)
from app.openapi import errors
from app.schemas import (
    Cursor,
    FieldError,
    GenerateRequest,
    GenerateResponse,
    JobOut,
    PromptOut,
    PromptPage,
    normalize_prompts,
)
from cai_dpo.core.api_keys import scoped_idempotency_key
from cai_dpo.core.constitutions import ConstitutionError
from cai_dpo.core.db import session_scope
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.progress import job_progress
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.tables import GenerationJob

router = APIRouter(tags=["generation"])


def request_hash(body: GenerateRequest) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@router.post("/generate", status_code=202, response_model=GenerateResponse, responses=errors(404, 409))
@access("generate")
def generate(
    body: GenerateRequest,
    request: Request,
    caller: CallerDep,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    prompts = normalize_prompts(body.prompts, settings)
    try:
        constitution = store.get(body.constitution)
    except ConstitutionError as exc:  # a bad name, or a file that never was valid
        raise FieldError("constitution", str(exc)) from exc
    revisions = body.revisions or constitution.spec.revisions
    if revisions > settings.max_revisions:
        raise FieldError("revisions", f"{revisions}; at most {settings.max_revisions} (CAI_MAX_REVISIONS)")
    # The version's row in a transaction of its own, committed before this request's: the first
    # jobs of a new version all insert it, and in the request's transaction the others waited for
    # it until the response. 50 concurrent first submissions deadlocked for 30 s that way (the
    # waiters held every worker thread the first request needed to finish). The request's own
    # transaction has not touched the database yet, so this takes no second connection.
    with session_scope(request.app.state.engine) as record:
        constitution_queries.store_constitution_version(record, constitution)
    # With no model named, a constitution whose evaluated model cleared the promotion gate uses it.
    promoted = evaluation_queries.promotion_for(session, constitution.name) if body.model is None else None
    model = checked_model(session, settings, promoted.model if promoted else body.model, field="model")
    mode = body.generation_mode()
    if (scorer := mode.effective_scorer()) is not None and scorer.model is not None:
        field = "verify.scorer.model" if mode.mode == "revise" else "scorer.model"
        checked_scorer_model(session, settings, scorer, field=field)
    digest = request_hash(body)
    idempotency_key = scoped_idempotency_key(caller, idempotency_key)
    if idempotency_key is not None:
        existing = job_queries.find_job_by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, session)
    sampling = {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_tokens": settings.max_tokens,
        "seed": None,
    } | (body.sampling.model_dump(exclude_none=True) if body.sampling else {})
    version = constitution_queries.store_constitution_version(session, constitution)
    job = job_queries.create_generation_job(
        session,
        constitution_version=version,
        model=model,
        revisions=revisions,
        sampling=sampling,
        options=mode.model_dump(mode="json", exclude_none=True),
        metadata=body.metadata,
        prompts=prompts,
        idempotency_key=idempotency_key,
        request_hash=digest,
        created_by=caller.name,
    )
    if job is None:  # a concurrent request with the same key won the insert; nothing was written
        return _replay(job_queries.find_job_by_idempotency_key(session, idempotency_key), digest, session)
    request.state.audit_ids = {"job_id": str(job.id)}
    return GenerateResponse(job_id=job.id, n_prompts=job.n_prompts, constitution_version=constitution.version)


def _replay(job: GenerationJob, digest: str, session: Session) -> GenerateResponse:
    if job.request_hash != digest:
        raise HTTPException(409, "Idempotency-Key: already used for a different request")
    version = constitution_queries.get_constitution_version(session, job.constitution_version_id)
    return GenerateResponse(job_id=job.id, n_prompts=job.n_prompts, constitution_version=version.content_hash)


def job_out(job: GenerationJob, stats: job_queries.JobStats, version: str | None) -> JobOut:
    progress = job_progress(
        stats.counts,
        cancelled=job.cancelled_at is not None,
        first_started_at=stats.first_started_at,
        last_finished_at=stats.last_finished_at,
        now=datetime.now(UTC),
    )
    return JobOut(
        id=job.id,
        status=progress.status,
        constitution=job.constitution_name,
        constitution_version=version,
        model=job.model,
        revisions=job.revisions,
        sampling=job.sampling,
        options=job.options,
        metadata=job.job_metadata,
        n_prompts=job.n_prompts,
        counts=stats.counts | {"flagged": stats.flagged},
        pairs_per_s=progress.rate_per_s,
        eta_s=progress.eta_s,
        created_at=job.created_at,
        cancelled_at=job.cancelled_at,
    )


def _jobs_out(session: Session, jobs: list[GenerationJob]) -> list[JobOut]:
    stats = job_queries.job_stats(session, [job.id for job in jobs])
    versions = {
        job.constitution_version_id: constitution_queries.get_constitution_version(
            session, job.constitution_version_id
        )
        for job in jobs
    }
    return [job_out(job, stats[job.id], versions[job.constitution_version_id].content_hash) for job in jobs]


@router.get("/jobs", response_model=list[JobOut])
@access("read")
def list_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[DbId | None, Query(description="Only jobs with a smaller id (paging).")] = None,
):
    return _jobs_out(session, job_queries.list_jobs(session, limit=limit, before_id=before))


@router.get("/jobs/{job_id}", response_model=JobOut, responses=errors(404))
@access("read")
def get_job(job_id: DbId, session: SessionDep):
    return _jobs_out(session, [or_404(job_queries.get_job(session, job_id), f"job_id: no job {job_id}")])[0]


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=errors(404))
@access("generate")
def cancel_job(job_id: DbId, session: SessionDep, caller: CallerDep):
    job = or_404(job_queries.get_job(session, job_id), f"job_id: no job {job_id}")
    require_owner_or_admin(caller, job.created_by, f"job {job_id}")
    job_queries.cancel_job(session, job_id)
    session.refresh(job)
    return _jobs_out(session, [job])[0]


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
    """The job's prompts with their state: `status=failed` shows what failed and why."""
    or_404(job_queries.get_job(session, job_id), f"job_id: no job {job_id}")
    limit = min(limit, settings.page_size_max)
    rows = job_queries.list_job_prompts(
        session, job_id, status=status, after_id=int(cursor) if cursor else None, limit=limit
    )
    items = [
        PromptOut(
            id=prompt.id,
            position=prompt.position,
            status=prompt.status,
            attempts=prompt.attempts,
            last_error=prompt.last_error,
            pair_id=pair_id,
            messages=prompt.messages,
            started_at=prompt.started_at,
            finished_at=prompt.finished_at,
        )
        for prompt, pair_id in rows
    ]
    return PromptPage(items=items, next_cursor=str(items[-1].id) if len(items) == limit else None)


@router.post("/jobs/{job_id}/retry", response_model=JobOut, responses=errors(404, 409))
@access("generate")
def retry_job(job_id: DbId, session: SessionDep, caller: CallerDep):
    """Queue the job's failed prompts again (e.g. after a model or settings fix)."""
    job = or_404(job_queries.get_job(session, job_id), f"job_id: no job {job_id}")
    require_owner_or_admin(caller, job.created_by, f"job {job_id}")
    if job.cancelled_at is not None:
        raise HTTPException(409, f"job_id: job {job_id} is cancelled; submit its prompts again")
    job_queries.retry_failed_prompts(session, job_id)
    return _jobs_out(session, [job])[0]
