"""Judge calibrations: queue one (a generation job of mode `calibrate`), the pair each of its
prompts judges, and its summary (`core/calibration.py`) read from its comparisons."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cai_dpo.core.calibration import CHOSEN, Judged, calibration_summary
from cai_dpo.core.generation_modes import CalibrateOptions, Sampling, ScorerSpec
from cai_dpo.core.pair_filter import PairFilter, filtered
from cai_dpo.core.queries.jobs import create_generation_job
from cai_dpo.core.tables import Comparison, ConstitutionVersion, GenerationJob, Pair, Prompt

OPEN_PROMPT_STATES = ("queued", "running")
MODE = GenerationJob.options["mode"].astext


def selected_pairs(session: Session, pairs: PairFilter, limit: int) -> list[tuple[int, list[dict[str, str]]]]:
    """The pairs a calibration judges: id and prompt, in id order."""
    query = filtered(select(Pair.id, Pair.prompt), pairs).order_by(Pair.id).limit(limit)
    return [(pair_id, prompt) for pair_id, prompt in session.execute(query)]


def queue_calibration_job(
    session: Session,
    *,
    judges: list[ScorerSpec],
    pairs: list[tuple[int, list[dict[str, str]]]],
    constitution_version: ConstitutionVersion,
    sampling: Sampling,
    request: dict[str, Any],
    created_by: str | None,
) -> GenerationJob:
    """One prompt row per pair (its prompt; the pair's id at the row's position in the job's
    `pair_ids`), for a worker serving the first judge's model. Every judge names its model."""
    job = create_generation_job(
        session,
        constitution_version=constitution_version,
        model=judges[0].model,
        revisions=1,
        sampling=sampling,
        metadata={"calibration": request, "pair_ids": [pair_id for pair_id, _ in pairs]},
        prompts=[prompt for _, prompt in pairs],
        idempotency_key=None,
        request_hash=None,
        options=CalibrateOptions(scorer=judges[0], judges=judges if len(judges) > 1 else None),
        created_by=created_by,
    )
    assert job is not None  # no idempotency key: nothing to collide with
    return job


def pair_for_prompt(session: Session, job_id: int, position: int) -> Pair | None:
    """The pair a calibration prompt judges."""
    pair_id = select(GenerationJob.job_metadata["pair_ids"][position].as_integer()).where(
        GenerationJob.id == job_id
    )
    return session.scalars(select(Pair).where(Pair.id == pair_id.scalar_subquery())).one_or_none()


def get_calibration_job(session: Session, job_id: int) -> GenerationJob | None:
    job = session.get(GenerationJob, job_id)
    return job if job is not None and (job.options or {}).get("mode") == "calibrate" else None


def calibration_out(session: Session, job: GenerationJob) -> dict[str, Any]:
    """A calibration as `GET /judges/calibrations/{id}` shows it: its judges, its progress and
    the numbers so far (`calibration_summary`)."""
    options = CalibrateOptions.model_validate(job.options)
    # The per-order probabilities only, not each judge's details (read on every poll).
    rows = session.execute(
        select(
            Comparison.preference["p_chosen_first"].as_float(),
            Comparison.preference["p_chosen_second"].as_float(),
            Comparison.length_a,
            Comparison.length_b,
        ).where(Comparison.job_id == job.id, Comparison.model_a == CHOSEN)
    ).all()
    by_status = dict(
        session.execute(
            select(Prompt.status, func.count()).where(Prompt.job_id == job.id).group_by(Prompt.status)
        ).all()
    )
    open_prompts = sum(by_status.get(status, 0) for status in OPEN_PROMPT_STATES)
    summary = calibration_summary([Judged(*row) for row in rows])
    return {
        "id": job.id,
        "status": "running" if open_prompts else "done",
        "judges": [spec.model_dump(mode="json") for spec in options.panel()],
        "judge": " + ".join(spec.model or "" for spec in options.panel()),
        "request": (job.job_metadata or {}).get("calibration"),
        "pairs": job.n_prompts,
        "open": open_prompts,
        "failed": by_status.get("failed", 0),
        "cancelled": by_status.get("cancelled", 0),
        "created_by": job.created_by,
        "created_at": job.created_at,
    } | summary


def list_calibrations(session: Session, *, judge: str | None = None, limit: int = 50) -> list[GenerationJob]:
    """Calibration jobs, newest first; with `judge`, those whose (first) judge is that model."""
    stmt = select(GenerationJob).where(MODE == "calibrate").order_by(GenerationJob.id.desc()).limit(limit)
    if judge is not None:
        stmt = stmt.where(GenerationJob.model == judge)
    return list(session.scalars(stmt))


def latest_calibrations(session: Session, judges: list[str]) -> dict[str, dict[str, Any]]:
    """The newest calibration of each judge model (a single judge, not a panel), summarised."""
    found: dict[str, dict[str, Any]] = {}
    for judge in dict.fromkeys(judges):
        for job in list_calibrations(session, judge=judge, limit=5):
            if not (job.options or {}).get("judges"):
                found[judge] = calibration_out(session, job)
                break
    return found
