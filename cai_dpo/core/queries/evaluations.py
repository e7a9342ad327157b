"""Evaluations of trained models: queue one, the win-rate comparison job, its comparisons,
settling them into a win rate, and promotion of the model when it clears the gate."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core import queue
from cai_dpo.core.evaluation import (
    BOOTSTRAP_RESAMPLES,
    EvaluationRequest,
    LengthControlled,
    WinRate,
    judge_models,
    length_controlled_win_rate,
    promotion_decision,
    win_rate,
)
from cai_dpo.core.generation_modes import CompareOptions, Sampling
from cai_dpo.core.queries.jobs import complete_prompts, create_generation_job
from cai_dpo.core.tables import (
    Comparison,
    ConstitutionVersion,
    Evaluation,
    GenerationJob,
    Pair,
    Promotion,
    Prompt,
    TrainingJob,
    TrainPolicy,
)

OPEN_PROMPT_STATES = ("queued", "running")


def create_evaluation(
    session: Session, train_id: int, request: EvaluationRequest, *, created_by: str | None = None
) -> Evaluation:
    evaluation = Evaluation(train_id=train_id, request=request.model_dump(mode="json"), created_by=created_by)
    session.add(evaluation)
    session.flush()
    queue.notify(session, queue.EVALUATIONS)
    return evaluation


def latest_evaluation(session: Session, train_id: int) -> Evaluation | None:
    return session.scalars(
        select(Evaluation).where(Evaluation.train_id == train_id).order_by(Evaluation.id.desc()).limit(1)
    ).one_or_none()


def claim_evaluation(
    session: Session, *, worker_id: str, lease_seconds: float, max_attempts: int
) -> Evaluation | None:
    return queue.claim_one(
        session,
        queue.EVALUATIONS,
        worker_id=worker_id,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
    )


def held_out_prompts(session: Session, job: TrainingJob, limit: int) -> list[list[dict[str, str]]]:
    """The prompts of the training job's held-out pairs (distinct, in id order)."""
    if not job.eval_pair_ids:
        return []
    prompts: list[list[dict[str, str]]] = []
    for (prompt,) in session.execute(
        select(Pair.prompt).where(Pair.id.in_(job.eval_pair_ids)).order_by(Pair.id)
    ):
        if prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == limit:
            break
    return prompts


def queue_comparison_job(
    session: Session,
    *,
    evaluation: Evaluation,
    train_job: TrainingJob,
    prompts: list[list[dict[str, str]]],
    constitution_version: ConstitutionVersion,
    baseline: str,
    sampling: Sampling,
    judge_model: str | None = None,
) -> GenerationJob:
    """The win-rate job: the trained model (`train:<id>`) and the baseline answer each prompt, the
    judge (or each judge of the panel) compares them. Every judge's model is fixed here: a judge
    naming none is `judge_model` (`CAI_JUDGE_MODEL`), else the baseline; never the trained model
    (`ValueError`). Its rows go through the prompt queue like any job's."""
    request = EvaluationRequest.model_validate(evaluation.request)
    judges = judge_models(request, trained=f"train:{train_job.id}", base=baseline, configured=judge_model)
    job = create_generation_job(
        session,
        constitution_version=constitution_version,
        model=f"train:{train_job.id}",
        revisions=1,
        sampling=sampling,
        metadata={"evaluation_id": evaluation.id},
        prompts=prompts,
        idempotency_key=f"evaluation:{evaluation.id}",
        request_hash=None,
        options=CompareOptions(
            baseline=baseline, scorer=judges[0], judges=judges if len(judges) > 1 else None
        ),
        created_by=evaluation.created_by,
    )
    if job is None:  # queued by an earlier attempt of this evaluation: that one stands
        job = session.scalars(
            select(GenerationJob).where(GenerationJob.idempotency_key == f"evaluation:{evaluation.id}")
        ).one()
    return job


def complete_comparison(
    session: Session, *, worker_id: str, prompt_id: int, comparison: dict[str, Any]
) -> bool:
    """Mark a comparison prompt done and store its result, in one transaction (as a pair is)."""
    return prompt_id in complete_prompts(
        session, Comparison, worker_id=worker_id, results={prompt_id: comparison}
    )


def comparison_summary(
    session: Session, job_id: int, *, resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, Any]:
    """The win rate of a comparison job so far (model_a is the trained model), with its progress.

    `wins + ties + losses` is `n`, the comparisons that finished; with `failed` (prompts whose
    comparison failed for good: too long for an engine, errors past the attempts), `open` (not yet
    done) and `cancelled` it is `prompts`, every prompt of the job. `length_controlled` is the
    length-controlled win rate (`length_controlled_win_rate`, lengths in characters), `lengths` the
    mean answer lengths, `judges` each judge's own win rate over the comparisons it judged."""
    rows = session.execute(
        select(Comparison.p_a, Comparison.length_a, Comparison.length_b, Comparison.judges).where(
            Comparison.job_id == job_id
        )
    ).all()
    p_trained = [row.p_a for row in rows]
    by_status = dict(
        session.execute(
            select(Prompt.status, func.count()).where(Prompt.job_id == job_id).group_by(Prompt.status)
        ).all()
    )
    open_prompts = sum(by_status.get(status, 0) for status in OPEN_PROMPT_STATES)
    failed = by_status.get("failed", 0)
    measured = [row for row in rows if row.length_a is not None and row.length_b is not None]
    controlled = length_controlled_win_rate(
        [row.p_a for row in measured],
        [row.length_a for row in measured],
        [row.length_b for row in measured],
        resamples=resamples,
    )
    per_judge: dict[str, list[float]] = {}
    for row in rows:
        for judged in row.judges or []:
            per_judge.setdefault(judged["model"], []).append(judged["p_a"])
    lengths = (
        {
            "unit": "characters",
            "mean_a": sum(row.length_a for row in measured) / len(measured),
            "mean_b": sum(row.length_b for row in measured) / len(measured),
            "a_longer": sum(row.length_a > row.length_b for row in measured),
            "n": len(measured),
        }
        if measured
        else None
    )
    # Set when the job was queued (workers/training/worker.py): prompts the trained model learned from.
    in_training = (session.get(GenerationJob, job_id).job_metadata or {}).get("prompts_in_training")
    return win_rate(p_trained).to_dict() | {
        "open": open_prompts,
        "failed": failed,
        "cancelled": by_status.get("cancelled", 0),
        "prompts": sum(by_status.values()),
        "length_controlled": controlled.to_dict() if controlled is not None else None,
        "lengths": lengths,
        "judges": [{"model": model} | win_rate(ps).to_dict() for model, ps in per_judge.items()],
        "job_id": job_id,
        "prompts_in_training": in_training,
    }


def settle_evaluations(session: Session, *, min_comparisons: int = 1) -> list[Evaluation]:
    """Finish the evaluations whose comparison job has no open prompt left: store the win rate and
    apply the promotion gate (at least `min_comparisons` finished: `CAI_EVAL_MIN_COMPARISONS`).
    Rows are locked so that concurrent workers settle each once."""
    waiting = session.scalars(
        select(Evaluation).where(Evaluation.status == "comparing").with_for_update(skip_locked=True)
    ).all()
    settled = []
    for evaluation in waiting:
        summary = comparison_summary(session, evaluation.compare_job_id)
        if summary["open"]:
            continue
        evaluation.win_rate = summary
        evaluation.status = "done"
        evaluation.finished_at = func.now()
        evaluation.promotion = apply_promotion_gate(
            session, evaluation, summary, min_comparisons=min_comparisons
        )
        settled.append(evaluation)
    return settled


def apply_promotion_gate(
    session: Session, evaluation: Evaluation, summary: dict[str, Any], *, min_comparisons: int = 1
) -> dict[str, Any]:
    """Promote the trained model of an automatic job whose policy asks for it, if it clears the gate
    (`promotion_decision`: enough comparisons, the length-controlled win rate's lower bound)."""
    train_job = session.get(TrainingJob, evaluation.train_id)
    policy = session.get(TrainPolicy, train_job.policy) if train_job and train_job.policy else None
    if policy is None or not policy.promote:
        return {"promoted": False, "reason": "no training policy with promote: true"}
    result = WinRate(
        wins=summary["wins"],
        ties=summary["ties"],
        losses=summary["losses"],
        n=summary["n"],
        rate=summary["rate"],
        ci95=tuple(summary["ci95"]),
    )
    controlled = summary.get("length_controlled")
    promoted, reason = promotion_decision(
        result,
        length_controlled=LengthControlled(**controlled | {"ci95": tuple(controlled["ci95"])})
        if controlled
        else None,
        min_comparisons=min_comparisons,
        failed=summary.get("failed", 0),
    )
    if promoted:
        promote(
            session,
            constitution=policy.constitution_name,
            model=f"train:{train_job.id}",
            train_id=train_job.id,
            evaluation_id=evaluation.id,
            reason=reason,
        )
    return {"promoted": promoted, "reason": reason, "constitution": policy.constitution_name}


def promote(
    session: Session, *, constitution: str, model: str, train_id: int, evaluation_id: int | None, reason: str
) -> None:
    stmt = insert(Promotion).values(
        constitution_name=constitution,
        model=model,
        train_id=train_id,
        evaluation_id=evaluation_id,
        reason=reason,
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["constitution_name"],
            set_={
                "model": stmt.excluded.model,
                "train_id": stmt.excluded.train_id,
                "evaluation_id": stmt.excluded.evaluation_id,
                "reason": stmt.excluded.reason,
                "promoted_at": func.now(),
            },
        )
    )


def promotion_for(session: Session, constitution: str) -> Promotion | None:
    return session.get(Promotion, constitution)


def demote(session: Session, constitution: str) -> bool:
    """Undo a promotion: the constitution generates with the default model again."""
    promotion = session.get(Promotion, constitution)
    if promotion is None:
        return False
    session.delete(promotion)
    return True
