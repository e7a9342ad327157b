"""Judges measured against people: calibrate a judge on human-labelled pairs and read the result."""

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from app.access import access
from app.deps import CallerDep, SessionDep, SettingsDep, StoreDep, or_404
from app.openapi import errors
from cai_dpo.core import services
from cai_dpo.core.calibration import CalibrationRequest
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import calibrations as calibration_queries
from cai_dpo.core.storable import StorableText

router = APIRouter(prefix="/judges", tags=["judges"])


class Share(BaseModel):
    rate: float | None = Field(description="The share (None without any).")
    ci95: list[float] = Field(description="Its Wilson 95% interval.")
    n: int


class Agreement(Share):
    agree: int
    disagree: int
    ties: int


class PositionBias(Share):
    mean_p_first: float | None = Field(description="Mean P(the answer shown first preferred).")


class LengthBias(BaseModel):
    judge_prefers_longer: float | None = Field(
        description="Share of pairs the judge gives the longer answer."
    )
    ci95: list[float]
    people_prefer_longer: float | None = Field(
        description="Share of pairs whose chosen answer is the longer."
    )
    bias: float | None = Field(description="judge_prefers_longer - people_prefer_longer.")
    n: int = Field(description="Pairs whose answers differ in length.")
    unit: Literal["characters"]


class CalibrationOut(BaseModel):
    id: int = Field(description="The calibration (its generation job's id).")
    status: Literal["running", "done"]
    judge: str = Field(description="The judge's model (a panel's joined by ' + ').")
    judges: list[ScorerSpec]
    request: dict[str, Any] | None
    pairs: int = Field(description="Pairs asked about.")
    open: int
    failed: int
    cancelled: int
    created_by: str | None
    created_at: datetime
    n: int = Field(description="Pairs judged.")
    agreement: Agreement = Field(
        description="Share of pairs whose P(chosen preferred), the mean of both orders, is above 0.5 "
        "(a tie within 0.05 of it counts half): agreement with the human label."
    )
    mean_p_chosen: float | None
    position_bias: PositionBias = Field(
        description="Share of the 2n verdicts (each pair in each order) won by the answer shown first; "
        "0.5: none."
    )
    consistent: float | None = Field(description="Share of pairs whose two orders pick the same answer.")
    length_bias: LengthBias


@router.post("/calibrate", status_code=202, response_model=CalibrationOut, responses=errors(404, 409))
@access("generate")
def calibrate(
    body: CalibrationRequest,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
):
    """Measure a judge (or a panel) against human labels: each stored pair the filter selects
    (e.g. imported HH-RLHF test pairs, `{"pairs": {"source": "hh"}}`) is read as people preferring
    `chosen`; a generation worker serving the judge's model asks it about every pair in both
    orders. Poll `GET /judges/calibrations/{id}` for agreement with the labels (and its 95%
    interval), n, position bias and length bias."""
    job = services.submit_calibration(session, body=body, caller=caller, settings=settings, store=store)
    request.state.audit_ids = {"calibration_id": str(job.id)}
    return calibration_queries.calibration_out(session, job)


@router.get("/calibrations", response_model=list[CalibrationOut])
@access("read")
def list_calibrations(
    session: SessionDep,
    judge: Annotated[
        StorableText | None, Query(max_length=1000, description="Only calibrations of this judge model.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
):
    """Calibrations, newest first."""
    jobs = calibration_queries.list_calibrations(session, judge=judge, limit=limit)
    return [calibration_queries.calibration_out(session, job) for job in jobs]


@router.get("/calibrations/{calibration_id}", response_model=CalibrationOut, responses=errors(404))
@access("read")
def get_calibration(calibration_id: DbId, session: SessionDep):
    job = or_404(
        calibration_queries.get_calibration_job(session, calibration_id),
        f"calibration_id: no calibration {calibration_id}",
    )
    return calibration_queries.calibration_out(session, job)
