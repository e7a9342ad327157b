"""Rows shaped into the response models, once: the API's routes answer with these, and the console's
pages show the same objects. A model reads the row's attributes of its own field names
(`from_attributes`); a view gives only what the row does not hold under that name."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.schemas import (
    EngineOccupancyOut,
    EvaluationOut,
    JobCounts,
    JobOut,
    JobUsage,
    PairOut,
    PromptOut,
    ServeOut,
    TrainJobOut,
    WorkerOut,
)
from cai_dpo.core.progress import eta_seconds, job_progress
from cai_dpo.core.queries import calibrations as calibration_queries
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import policies as policy_queries
from cai_dpo.core.queries import reviews as review_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.serving import serve_hint
from cai_dpo.core.tables import GenerationJob, Pair, PairReview, Prompt, TrainingJob, TrainPolicy, Worker

M = TypeVar("M", bound=BaseModel)


class _Row:
    """A row with some attributes given over it: what a model reads with `from_attributes`."""

    __slots__ = ("_row", "_given")

    def __init__(self, row: object, given: dict[str, Any]):
        self._row, self._given = row, given

    def __getattr__(self, name: str) -> Any:
        return self._given[name] if name in self._given else getattr(self._row, name)


def shaped(model: type[M], row: object, /, **given: Any) -> M:
    """`model` from the row's attributes. Fields the row names otherwise (and `metadata`, which a
    mapped class holds as its table's `MetaData`) or that are computed come as `given`."""
    return model.model_validate(_Row(row, given), from_attributes=True)


# --- generation -----------------------------------------------------------------------------------


def job_usage(job: GenerationJob, *, gpu_hour_cost: float | None) -> JobUsage:
    budget = job.max_generated_tokens
    return JobUsage(
        generated_tokens=job.generated_tokens,
        prompt_tokens=job.prompt_tokens,
        engine_seconds=round(job.engine_seconds, 3),
        cost=None if gpu_hour_cost is None else job.engine_seconds / 3600 * gpu_hour_cost,
        max_generated_tokens=budget,
        budget_reached=budget is not None and job.generated_tokens >= budget,
    )


def job_out(
    job: GenerationJob, stats: job_queries.JobStats, version: str | None, *, gpu_hour_cost: float | None
) -> JobOut:
    progress = job_progress(
        stats.counts,
        cancelled=job.cancelled_at is not None,
        first_started_at=stats.first_started_at,
        last_finished_at=stats.last_finished_at,
        now=datetime.now(UTC),
    )
    return shaped(
        JobOut,
        job,
        status=progress.status,
        constitution=job.constitution_name,
        constitution_version=version,
        options=job_queries.job_options(job.options),  # which of the two models the stored dict is
        metadata=job.job_metadata,
        counts=JobCounts(**stats.counts, flagged=stats.flagged),
        pairs_per_s=progress.rate_per_s,
        eta_s=progress.eta_s,
        usage=job_usage(job, gpu_hour_cost=gpu_hour_cost),
    )


def jobs_out(session: Session, jobs: list[GenerationJob], *, gpu_hour_cost: float | None) -> list[JobOut]:
    """`job_out` of each, with the counts and constitution versions read for all at once; the
    cost where `gpu_hour_cost` (`CAI_GPU_HOUR_COST`) is set."""
    stats = job_queries.job_stats(session, [job.id for job in jobs])
    versions = {
        job.constitution_version_id: constitution_queries.get_constitution_version(
            session, job.constitution_version_id
        )
        for job in jobs
    }
    return [
        job_out(
            job,
            stats[job.id],
            versions[job.constitution_version_id].content_hash,
            gpu_hour_cost=gpu_hour_cost,
        )
        for job in jobs
    ]


def prompt_out(prompt: Prompt, pair_id: int | None, flags: list[str] | None = None) -> PromptOut:
    return shaped(PromptOut, prompt, pair_id=pair_id, flags=flags or [])


# --- pairs ----------------------------------------------------------------------------------------


def pair_out(
    pair: Pair,
    version: str | None,
    *,
    detail: bool,
    review: PairReview | None = None,
    reviews: list[dict] | None = None,
) -> PairOut:
    """A pair; with `detail`, its trajectory, sampling and usage too (a list shows none of them)."""
    return shaped(
        PairOut,
        pair,
        constitution=pair.constitution_name,
        constitution_version=version,
        principles=pair.trajectory.get("principles", []),
        trajectory=pair.trajectory if detail else None,
        sampling=pair.sampling if detail else None,
        usage=pair.usage if detail else None,
        metadata=pair.pair_metadata,
        review=review.status if review else None,
        reviewed_chosen=review.chosen_text if review else None,
        reviews=reviews,
    )


# --- training -------------------------------------------------------------------------------------


def pair_detail(session: Session, pair_id: int) -> PairOut | None:
    """One pair with its trajectory, its review in force and the review history; None if none."""
    found = pair_queries.get_pair(session, pair_id)
    if found is None:
        return None
    latest = review_queries.latest_reviews(session, [pair_id]).get(pair_id)
    return pair_out(*found, detail=True, review=latest, reviews=review_queries.history(session, pair_id))


def evaluation_out(session: Session, job: TrainingJob) -> EvaluationOut | None:
    evaluation = evaluation_queries.latest_evaluation(session, job.id)
    if evaluation is None:
        return None
    win = evaluation.win_rate
    if win is None and evaluation.compare_job_id is not None:  # still comparing: the count so far
        # A lighter bootstrap for the live figures (every GET); the settled ones use the full one.
        win = evaluation_queries.comparison_summary(session, evaluation.compare_job_id, resamples=200)
    held_out = {"before": job.eval_before, "after": job.eval_after} if job.eval_after else None
    accuracy = {"held_out": held_out, "external": evaluation.external}
    return shaped(
        EvaluationOut,
        evaluation,
        win_rate=win,
        reward_accuracy=accuracy if any(accuracy.values()) else None,
        error=evaluation.last_error,
    )


def judge_calibrations(session: Session, run: TrainJobOut) -> dict[str, dict[str, Any] | None]:
    """Each judge of the run's evaluation with its latest calibration against human labels (None:
    never calibrated), for the console to show beside the evaluation."""
    win = run.evaluation.win_rate if run.evaluation is not None else None
    judges = [judge["model"] for judge in (win or {}).get("judges") or []]
    found = calibration_queries.latest_calibrations(session, judges)
    return {judge: found.get(judge) for judge in judges}


def train_out(session: Session, job: TrainingJob) -> TrainJobOut:
    latest = training_queries.latest_training_metric(session, job.id)
    running = job.status == "running" and job.started_at is not None
    elapsed = (datetime.now(UTC) - job.started_at).total_seconds() if running else 0
    return shaped(
        TrainJobOut,
        job,
        n_train_pairs=len(job.pair_ids) if job.pair_ids is not None else None,
        n_eval_pairs=len(job.eval_pair_ids) if job.eval_pair_ids is not None else None,
        eta_s=eta_seconds(job.step, job.total_steps or 0, elapsed) if running else None,
        latest_metrics=latest.values if latest else None,
        artifact=job.artifact_path,
        model=f"train:{job.id}" if job.status == "succeeded" else None,
        serve=ServeOut(**serve_hint(job.id)) if servable(job) else None,
        evaluation=evaluation_out(session, job),
        error=job.last_error,
    )


def servable(job: TrainingJob) -> bool:
    """A finished run whose model generates (a reward model scores instead)."""
    return job.status == "succeeded" and bool(job.artifact_path) and not job.trains_reward_model


def policy_out(session: Session, policy: TrainPolicy) -> dict[str, Any]:
    """A policy as `/train/policies` has always answered it (a plain object: the OpenAPI document
    gives it no schema, and a new one would change the document)."""
    promotion = evaluation_queries.promotion_for(session, policy.constitution_name)
    return {
        "constitution": policy.constitution_name,
        "min_new_pairs": policy.min_new_pairs,
        "base_model": policy.base_model,
        "enabled": policy.enabled,
        "params": policy.params,
        # Progress towards the next automatic job: it starts when this reaches min_new_pairs.
        "pairs_waiting": policy_queries.policy_pairs_waiting(session, policy.constitution_name),
        "promote": policy.promote,
        "promoted": None
        if promotion is None
        else {
            "model": promotion.model,
            "train_id": promotion.train_id,
            "reason": promotion.reason,
            "promoted_at": promotion.promoted_at.isoformat(),
        },
    }


# --- workers --------------------------------------------------------------------------------------


def workers_out(workers: list[Worker]) -> list[WorkerOut]:
    """Each worker, healthy unless its last heartbeat reported a problem."""
    out = []
    for worker in workers:
        stats = worker.stats or {}
        problem = stats.get("problem")
        engine = EngineOccupancyOut.model_validate(stats) if worker.kind == "generate" else None
        out.append(shaped(WorkerOut, worker, healthy=problem is None, problem=problem, engine=engine))
    return out
