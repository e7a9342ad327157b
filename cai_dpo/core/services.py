"""What a client can do to the service, each action once: submit a generation job (or the
console's one-prompt try of an unsaved constitution), cancel or retry one, submit or cancel a
training job, evaluate its model, review a pair, save a constitution.

Each is a function of a database session and the typed request (`core/requests.py`), checks
what exists and who may act, and raises `FieldError` naming the field (a 4xx). The API's routes
and the console's pages call these and shape the answer; they never call each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cai_dpo.core.api_keys import ApiKey, scoped_idempotency_key
from cai_dpo.core.calibration import CalibrationRequest
from cai_dpo.core.constitutions import (
    Constitution,
    ConstitutionError,
    ConstitutionStore,
    VersionMismatch,
    check_name,
)
from cai_dpo.core.db import session_scope
from cai_dpo.core.errors import FieldError
from cai_dpo.core.evaluation import EvaluationRequest, judge_models
from cai_dpo.core.generation_modes import GenerationMode, SamplingRequest, ScorerSpec
from cai_dpo.core.model_sources import ModelKind, ModelNotFound, check_model_name, local_model_folder
from cai_dpo.core.queries import calibrations as calibration_queries
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import reviews as review_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.requests import GenerateRequest, ReviewIn, TrainRequest, normalize_prompts
from cai_dpo.core.settings import Settings
from cai_dpo.core.tables import Evaluation, GenerationJob, PairReview, TrainingJob
from cai_dpo.core.training_params import TrainParams


def checked_model(
    session: Session, settings: Settings, model: str | None, *, field: str, kind: ModelKind = "policy"
) -> str:
    """A model a job may use, or a 404 naming the field (a 422 where it is of the wrong `kind`): what
    a model reference may look like is `ModelRef`'s (a 422 while the body is read); whether it exists
    is this check's."""
    try:
        return check_model_name(session, model, settings, kind=kind)
    except ModelNotFound as exc:
        raise FieldError(field, str(exc), exc.status) from None


def checked_scorer_model(session: Session, settings: Settings, spec: ScorerSpec, *, field: str) -> None:
    """A scorer's model exists and is of its kind: a judge's is a model a job may use, a reward model
    a local Hugging Face folder or a reward model trained here (`train:<id>`), an implicit scorer a
    finished training job of a policy."""
    try:
        if spec.kind == "reward_model" and not (spec.model or "").startswith("train:"):
            local_model_folder(spec.model or "")
        else:
            kind = "reward_model" if spec.kind == "reward_model" else "policy"
            check_model_name(session, spec.model, settings, kind=kind)
    except ModelNotFound as exc:
        raise FieldError(field, str(exc), exc.status) from None


def require_owner_or_admin(caller: ApiKey, owner: str | None, what: str) -> None:
    """A `generate`/`train` key acts on its own jobs; `admin` on any."""
    if not caller.allows("admin") and owner is not None and owner != caller.name:
        raise FieldError(
            "authorization", f"{what} belongs to key {owner!r}; key {caller.name!r} lacks admin", 403
        )


# --- generation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmittedJob:
    job: GenerationJob
    constitution_version: str  # its content hash


def request_hash(body: GenerateRequest) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def submit_generation_job(
    session: Session,
    *,
    body: GenerateRequest,
    caller: ApiKey,
    settings: Settings,
    store: ConstitutionStore,
    engine: Engine,
    idempotency_key: str | None = None,
) -> SubmittedJob:
    """Queue one prompt row per prompt; a retried request with the same `Idempotency-Key` (of the
    same API key) gets the job it made, one with other content a 409."""
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
    with session_scope(engine) as record:
        constitution_queries.store_constitution_version(record, constitution)
    # With no model named, a constitution whose evaluated model cleared the promotion gate uses it.
    promoted = evaluation_queries.promotion_for(session, constitution.name) if body.model is None else None
    model = checked_model(session, settings, promoted.model if promoted else body.model, field="model")
    mode = body.generation_mode()
    if (scorer := mode.effective_scorer()) is not None and scorer.model is not None:
        field = "verify.scorer.model" if mode.mode == "revise" else "scorer.model"
        checked_scorer_model(session, settings, scorer, field=field)
    digest = request_hash(body)
    key = scoped_idempotency_key(caller, idempotency_key)
    if key is not None and (existing := job_queries.find_job_by_idempotency_key(session, key)) is not None:
        return _replayed(session, existing, digest)
    version = constitution_queries.store_constitution_version(session, constitution)
    job = job_queries.create_generation_job(
        session,
        constitution_version=version,
        model=model,
        revisions=revisions,
        sampling=(body.sampling or SamplingRequest()).resolve(settings),
        options=mode,
        metadata=body.metadata,
        prompts=prompts,
        idempotency_key=key,
        request_hash=digest,
        created_by=caller.name,
        max_generated_tokens=body.max_generated_tokens,
    )
    if job is None:  # a concurrent request with the same key won the insert; nothing was written
        return _replayed(session, job_queries.find_job_by_idempotency_key(session, key), digest)
    return SubmittedJob(job, constitution.version)


def _replayed(session: Session, job: GenerationJob, digest: str) -> SubmittedJob:
    if job.request_hash != digest:
        raise FieldError("Idempotency-Key", "already used for a different request", 409)
    version = constitution_queries.get_constitution_version(session, job.constitution_version_id)
    return SubmittedJob(job, version.content_hash)


def submit_try_job(
    session: Session,
    *,
    name: str,
    text: str,
    prompt: str,
    revisions: int | None,
    max_tokens: int | None,
    caller: ApiKey,
    settings: Settings,
    store: ConstitutionStore,
) -> GenerationJob:
    """One prompt through the loop with a constitution's unsaved text: the text is stored as a
    version (under `try_name(name)`) by its content hash, the file is not touched, and a generation
    worker runs the one-prompt job like any other."""
    constitution = store.validate(check_name(name), text)
    if not prompt.strip():
        raise FieldError("prompt", "write a prompt to try")
    messages = normalize_prompts([prompt.strip()], settings)
    revisions = revisions or constitution.spec.revisions
    if not 1 <= revisions <= settings.max_revisions:
        raise FieldError("revisions", f"{revisions}; from 1 to {settings.max_revisions}")
    promoted = evaluation_queries.promotion_for(session, name)
    model = checked_model(session, settings, promoted.model if promoted else None, field="model")
    draft = constitution.model_copy(update={"name": try_name(name)})
    version = constitution_queries.store_constitution_version(session, draft)
    job = job_queries.create_generation_job(
        session,
        constitution_version=version,
        model=model,
        revisions=revisions,
        sampling=SamplingRequest(max_tokens=max_tokens).resolve(settings),
        options=GenerationMode(),
        metadata={"console_try": name},
        prompts=messages,
        idempotency_key=None,
        request_hash=None,
        created_by=caller.name,
    )
    assert job is not None  # no idempotency key: the insert cannot lose to another
    return job


def try_name(name: str) -> str:
    """Where a try's draft version and its pair are kept: apart from the constitution's own (`:`
    is in no constitution's name), so neither its history nor its datasets take them in."""
    return f"try:{name}"[:64]


def cancel_generation_job(session: Session, job_id: int, caller: ApiKey) -> GenerationJob:
    job = _job(session, job_id)
    require_owner_or_admin(caller, job.created_by, f"job {job_id}")
    job_queries.cancel_job(session, job_id)
    session.refresh(job)
    return job


def retry_generation_job(session: Session, job_id: int, caller: ApiKey) -> GenerationJob:
    """Queue the job's failed prompts again (e.g. after a model or settings fix)."""
    job = _job(session, job_id)
    require_owner_or_admin(caller, job.created_by, f"job {job_id}")
    if job.cancelled_at is not None:
        raise FieldError("job_id", f"job {job_id} is cancelled; submit its prompts again", 409)
    job_queries.retry_failed_prompts(session, job_id)
    return job


def _job(session: Session, job_id: int) -> GenerationJob:
    job = job_queries.get_job(session, job_id)
    if job is None:
        raise FieldError("job_id", f"no job {job_id}", 404)
    return job


# --- training --------------------------------------------------------------------------------------


def checked_base_model(session: Session, settings: Settings, model: str | None, params: TrainParams) -> str:
    """A run's base model (a job's, or a policy's): a policy; a reward model starts from either kind
    (the SFT policy, as the recipes do, or a reward model trained further)."""
    kind = "any" if params.objective == "reward_model" else "policy"
    return checked_model(session, settings, model, field="base_model", kind=kind)


def submit_training_job(
    session: Session, *, body: TrainRequest, caller: ApiKey, settings: Settings
) -> TrainingJob:
    base_model = checked_base_model(session, settings, body.base_model, body)
    if pair_queries.count_pairs(session, body.dataset) == 0:
        raise FieldError("dataset", f"no pairs match {body.dataset.described()}", 409)
    return training_queries.create_training_job(
        session,
        base_model=base_model,
        dataset=body.dataset.described(),
        params=body.params(),
        created_by=caller.name,
    )


def submit_evaluation(
    session: Session, *, train_id: int, body: EvaluationRequest | None, caller: ApiKey, settings: Settings
) -> Evaluation:
    """Queue an evaluation of a finished training job's model. Its judges must exist and must not
    be the model under evaluation (`train:<id>`): a 422 naming the judge's field; a judge naming no
    model is `CAI_JUDGE_MODEL`, else the base model, fixed when the comparison job is queued."""
    job = training_queries.get_training_job(session, train_id)
    if job is None:
        raise FieldError("train_id", f"no training job {train_id}", 404)
    if job.status != "succeeded":
        raise FieldError(
            "train_id", f"training job {train_id} is {job.status}; only a finished model is evaluated", 409
        )
    if job.trains_reward_model:
        raise FieldError(
            "train_id",
            f"training job {train_id} trained a reward model: it generates no answers to compare; its "
            "evaluation is the held-out pairs' reward accuracy (eval_before, eval_after)",
            409,
        )
    body = body or EvaluationRequest()
    if body.prompts is None and not job.eval_pair_ids:
        raise FieldError(
            "prompts", "the job held out no pairs (eval_fraction 0): give the prompts to compare on"
        )
    base = job.base_model or settings.model
    try:
        judges = judge_models(body, trained=f"train:{train_id}", base=base, configured=settings.judge_model)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise FieldError(field, message) from None
    for (field, spec), judge in zip(body.judge_fields(), judges, strict=True):
        if spec.model is not None:
            checked_model(session, settings, judge.model, field=field)
    return evaluation_queries.create_evaluation(session, train_id, body, created_by=caller.name)


def submit_calibration(
    session: Session,
    *,
    body: CalibrationRequest,
    caller: ApiKey,
    settings: Settings,
    store: ConstitutionStore,
) -> GenerationJob:
    """Queue a judge's calibration on stored human-labelled pairs (`core/calibration.py`): a
    generation job of mode `calibrate`. A judge naming no model is `CAI_JUDGE_MODEL`, else the
    server's model, fixed here; a named one must exist (404 naming its field); no pair matching
    `pairs` is a 409 (as `/train`'s dataset)."""
    judges = []
    for field, spec in body.judge_fields():
        if spec.model is not None:
            checked_model(session, settings, spec.model, field=field)
        judges.append(spec.model_copy(update={"model": spec.model or settings.judge_model or settings.model}))
    pairs = calibration_queries.selected_pairs(session, body.pairs, body.max_pairs)
    if not pairs:
        raise FieldError("pairs", f"no pairs match {body.pairs.described()}", 409)
    try:
        constitution = store.get(body.constitution or "harmless")
    except ConstitutionError as exc:
        raise FieldError("constitution", str(exc)) from exc
    version = constitution_queries.store_constitution_version(session, constitution)
    return calibration_queries.queue_calibration_job(
        session,
        judges=judges,
        pairs=pairs,
        constitution_version=version,
        sampling=SamplingRequest(seed=0).resolve(settings),
        request=body.model_dump(mode="json", exclude_defaults=True),
        created_by=caller.name,
    )


def cancel_training_job(session: Session, train_id: int, caller: ApiKey) -> TrainingJob:
    owner = training_queries.get_training_job(session, train_id)
    if owner is None:
        raise FieldError("train_id", f"no training job {train_id}", 404)
    require_owner_or_admin(caller, owner.created_by, f"training job {train_id}")
    job = training_queries.request_training_cancel(session, train_id)
    if job is None:
        raise FieldError("train_id", f"no training job {train_id}", 404)
    session.flush()
    session.refresh(job)
    return job


# --- review and constitutions ------------------------------------------------------------------------


def review_pair(session: Session, *, pair_id: int, body: ReviewIn | None, reviewer: ApiKey) -> PairReview:
    """Approve or reject the pair, or approve it with an edited chosen answer: a new review version
    recorded with the key's name and the time. The generated text is never overwritten."""
    found = pair_queries.get_pair(session, pair_id)
    if found is None:
        raise FieldError("pair_id", f"no pair {pair_id}", 404)
    if body is None:
        raise FieldError("body", "a review needs `status`: approved or rejected")
    return review_queries.add_review(
        session, found[0], status=body.status, reviewer=reviewer.name, chosen=body.chosen
    )


def save_constitution(
    engine: Engine, store: ConstitutionStore, name: str, text: str, if_match: str | None
) -> Constitution:
    """Validate, record the version in the database, then replace the file (so every text that was
    ever on disk has its row), with the lost-update check of `If-Match`."""
    constitution = store.validate(check_name(name), text)
    with session_scope(engine) as record:
        constitution_queries.store_constitution_version(record, constitution)
    try:
        return store.put(constitution, if_match=if_match.strip('"') if if_match else None)
    except VersionMismatch as exc:
        # 409 as GitHub's contents API answers a stale `sha`: the request conflicts with the
        # resource's current state (a 412 is outside what API clients and fuzzers expect of a body).
        raise FieldError(
            "if-match",
            f"the constitution is at version {exc.current}, not {exc.expected}; reload and retry",
            409,
        ) from None
