"""The training pages: every run, live, and the form that starts one from a filter; a run's page
with its per-step charts, held-out metrics, evaluation and Cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from app.access import CONSOLE_FORMS, access
from app.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.ui.forms import ACTION_ERRORS, ConsoleError, FormDep, act, errors_fragment, given, text_field
from app.ui.pages.pairs import FILTER_FIELDS
from app.ui.render import PAGE_SIZE, go, list_page, page
from app.views import judge_calibrations, train_out
from cai_dpo.core import services
from cai_dpo.core.pair_filter import DbId
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.requests import TrainRequest
from cai_dpo.core.tables import TrainingJob

OPEN_TRAIN_STATES = {"queued", "running"}

router = APIRouter()

TRAIN_PARAMS = (
    "base_model",
    "loss_type",
    "beta",
    "learning_rate",
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation",
    "max_length",
    "eval_fraction",
    "seed",
)


@router.get("/train")
@access("read")
def training_page(request: Request, session: SessionDep, store: StoreDep, before: DbId | None = None):
    runs = [
        train_out(session, job)
        for job in training_queries.list_training_jobs(session, limit=PAGE_SIZE, before_id=before)
    ]
    return list_page(request, "training.html", "runs", runs, OPEN_TRAIN_STATES, constitutions=store.names())


def train_body(form: FormData) -> dict[str, Any]:
    """The `POST /train` body the start form stands for."""
    dataset = given(form, *FILTER_FIELDS)
    if dataset.get("include_flagged") == "on":
        dataset["include_flagged"] = "true"
    body: dict[str, Any] = {"dataset": dataset, **given(form, *TRAIN_PARAMS)}
    objective = text_field(form, "objective").strip()
    if "," in objective:  # staged: "sft,dpo"
        body["stages"] = objective.split(",")
    elif objective:
        body["objective"] = objective
    lora = given(form, "lora_r", "lora_alpha")
    if lora:
        body["lora"] = {key.removeprefix("lora_"): value for key, value in lora.items()}
    if not text_field(form, "evaluate"):
        body["evaluate"] = False
    return body


@router.post("/train")
@access("train", accepts=CONSOLE_FORMS)
def start_training(
    request: Request, form: FormDep, session: SessionDep, settings: SettingsDep, caller: CallerDep
):
    try:
        body = TrainRequest.model_validate(train_body(form), strict=False)  # a form's text
        job = act(
            session,
            lambda: services.submit_training_job(session, body=body, caller=caller, settings=settings),
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("train-result", exc)
    request.state.audit_ids = {"train_id": str(job.id)}
    return go(request, f"/ui/train/{job.id}")


def _run_or_404(session: Session, train_id: int) -> TrainingJob:
    job = training_queries.get_training_job(session, train_id)
    if job is None:
        raise ConsoleError(404, "train_id", f"no training job {train_id}")
    return job


# The charts of a run by its objective: title, then the metrics drawn (TRL's names, as the trainer
# logs them for that objective; a staged run's are DPO's, its SFT stage drawing the loss alone).
CHARTS = {
    "dpo": (
        ("loss", "Loss", ["loss"]),
        ("accuracy", "Reward accuracy", ["rewards/accuracies"]),
        ("margins", "Reward margin", ["rewards/margins"]),
        ("logps", "Log-probs (chosen, rejected)", ["logps/chosen", "logps/rejected"]),
        ("lr", "Learning rate", ["learning_rate"]),
    ),
    "sft": (
        ("loss", "Loss (NLL per answer token)", ["loss"]),
        ("logps", "Log-prob of the chosen answers", ["logps/chosen"]),
        ("lr", "Learning rate", ["learning_rate"]),
    ),
    "reward_model": (
        ("loss", "Loss (Bradley-Terry)", ["loss"]),
        ("accuracy", "Reward accuracy", ["accuracy"]),
        ("margins", "Reward margin", ["margin"]),
        ("rewards", "Rewards (chosen, rejected)", ["rewards/chosen", "rewards/rejected"]),
        ("lr", "Learning rate", ["learning_rate"]),
    ),
}


@router.get("/train/{train_id}")
@access("read")
def training_run_page(request: Request, train_id: DbId, session: SessionDep):
    run = train_out(session, _run_or_404(session, train_id))
    evals = list(dict.fromkeys([*(run.eval_before or {}), *(run.eval_after or {})]))
    return page(
        request,
        "training_run.html",
        run=run,
        live=run.status in OPEN_TRAIN_STATES,
        charts=CHARTS[(run.params or {}).get("objective", "dpo")],
        eval_keys=evals,
        calibrations=judge_calibrations(session, run),
    )


@router.get("/train/{train_id}/metrics.json")
@access("read")
def training_run_metrics(train_id: DbId, session: SessionDep):
    _run_or_404(session, train_id)
    rows = [{"step": m.step, **m.values} for m in training_queries.training_metrics(session, train_id)]
    return JSONResponse(rows, headers={"Cache-Control": "no-store"})


@router.post("/train/{train_id}/cancel")
@access("train", accepts=CONSOLE_FORMS)
def cancel_training(request: Request, train_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    try:
        act(session, lambda: services.cancel_training_job(session, train_id, caller))
    except ACTION_ERRORS as exc:
        return errors_fragment("train-action", exc)
    return go(request, f"/ui/train/{train_id}")
