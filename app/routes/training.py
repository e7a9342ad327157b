"""Training: start DPO runs, follow their metrics, cancel them, and set automatic policies."""

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy.orm import Session

from app.access import access
from app.deps import CallerDep, SessionDep, SettingsDep, or_404
from app.openapi import NAME, errors
from app.schemas import TrainJobOut
from app.views import policy_out, train_out
from cai_dpo.core import services
from cai_dpo.core.constitutions import check_name
from cai_dpo.core.evaluation import EvaluationRequest
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.queries import policies as policy_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.requests import TrainRequest
from cai_dpo.core.tables import TrainingJob
from cai_dpo.core.training_params import TrainPolicyIn

router = APIRouter(prefix="/train", tags=["training"])

Name = Annotated[
    str,
    Path(
        description=f"A constitution: {NAME['description']}", json_schema_extra={"pattern": NAME["pattern"]}
    ),
]


# Policies first: `/train/policies` must not be taken for `/train/{train_id}`.
@router.get("/policies")
@access("read")
def list_policies(session: SessionDep):
    return [policy_out(session, p) for p in policy_queries.list_train_policies(session)]


@router.put("/policies/{name}", responses=errors(404))
@access("train")
def put_policy(name: Name, body: TrainPolicyIn, session: SessionDep, settings: SettingsDep):
    check_name(name)
    if body.base_model is not None:
        services.checked_base_model(session, settings, body.base_model, body.params)
    return policy_out(
        session, policy_queries.upsert_train_policy(session, constitution_name=name, **body.db_values())
    )


@router.delete("/policies/{name}", status_code=204, responses=errors(404))
@access("train")
def delete_policy(name: Name, session: SessionDep):
    or_404(policy_queries.delete_train_policy(session, name) or None, f"name: no policy for {name!r}")


@router.delete("/policies/{name}/promotion", status_code=204, responses=errors(404))
@access("train")
def demote(name: Name, session: SessionDep):
    """Undo a promotion: the constitution generates with the default model again."""
    or_404(
        evaluation_queries.demote(session, check_name(name)) or None, f"name: no promoted model for {name!r}"
    )


@router.post("", status_code=202, responses=errors(404, 409))
@access("train")
def start_training(
    body: TrainRequest, request: Request, caller: CallerDep, session: SessionDep, settings: SettingsDep
):
    job = services.submit_training_job(session, body=body, caller=caller, settings=settings)
    request.state.audit_ids = {"train_id": str(job.id)}
    return {"train_id": job.id}


@router.get("", response_model=list[TrainJobOut])
@access("read")
def list_training(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: DbId | None = None,
):
    return [
        train_out(session, job)
        for job in training_queries.list_training_jobs(session, limit=limit, before_id=before)
    ]


def _job_or_404(session: Session, train_id: int) -> TrainingJob:
    return or_404(
        training_queries.get_training_job(session, train_id), f"train_id: no training job {train_id}"
    )


@router.get("/{train_id}", response_model=TrainJobOut, responses=errors(404))
@access("read")
def get_training(train_id: DbId, session: SessionDep):
    return train_out(session, _job_or_404(session, train_id))


@router.get(
    "/{train_id}/metrics",
    response_model=list[dict[str, Any]],
    responses={
        200: {
            "description": "Every step's metrics: JSON rows, or CSV with `format=csv`.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        **errors(404),
    },
)
@access("read")
def training_metrics(train_id: DbId, session: SessionDep, format: Literal["json", "csv"] = "json"):
    _job_or_404(session, train_id)
    rows = [{"step": m.step, **m.values} for m in training_queries.training_metrics(session, train_id)]
    if format == "json":
        return rows
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns or ["step"])
    writer.writeheader()
    writer.writerows(rows)
    return PlainTextResponse(out.getvalue(), media_type="text/csv")


@router.post("/{train_id}/cancel", response_model=TrainJobOut, responses=errors(404))
@access("train")
def cancel_training(train_id: DbId, session: SessionDep, caller: CallerDep):
    return train_out(session, services.cancel_training_job(session, train_id, caller))


@router.post("/{train_id}/evaluate", status_code=202, response_model=TrainJobOut, responses=errors(404, 409))
@access("train")
def evaluate_training(
    train_id: DbId,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    body: EvaluationRequest | None = None,
):
    """Queue an evaluation of the trained model: a win rate against its base model on held-out
    prompts (judged in both orders by a judge, or a panel, that is not the trained model; raw and
    length-controlled), and reward accuracy on an imported preference set."""
    evaluation = services.submit_evaluation(
        session, train_id=train_id, body=body, caller=caller, settings=request.app.state.settings
    )
    request.state.audit_ids = {"train_id": str(train_id), "evaluation_id": str(evaluation.id)}
    return train_out(session, _job_or_404(session, train_id))
