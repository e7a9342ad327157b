"""Pydantic models at the HTTP edge: request bodies and response shapes.

Limits that come from settings (prompt count, prompt length) are checked by
`normalize_prompts`, which raises `FieldError` naming the offending field.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime
from typing import Annotated, Any, Literal

from annotated_types import Interval
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.settings import Settings
from workers.training.config import TrainParams  # pydantic only: the API never imports torch

Role = Literal["system", "user", "assistant"]

# Row ids are PostgreSQL bigints: a larger number names no row and must not reach a query.
DB_ID_MAX = 2**63 - 1
DbId = Annotated[int, Interval(ge=1, le=DB_ID_MAX)]
# A `next_cursor`: the last id of the previous page.
Cursor = Annotated[str, Field(pattern=r"^\d{1,18}$", description="`next_cursor` of the previous page.")]


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store this text, or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def find_unstorable(value: Any) -> tuple[str, str] | None:
    """The first place in a JSON-like value that PostgreSQL cannot store, and why; None if none.

    Text must be valid Unicode without NUL, numbers finite (JSON has no NaN). Iterative, so a
    deeply nested upload cannot exhaust the stack.
    """
    queue = deque([("", value)])
    while queue:
        path, item = queue.popleft()
        if isinstance(item, str):
            if reason := text_problem(item):
                return path, reason
        elif isinstance(item, float) and not math.isfinite(item):
            return path, f"{item} is not a JSON number"
        elif isinstance(item, dict | list):
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and (reason := text_problem(key)):
                    return path, f"a key {reason}"  # the key itself could not be shown back
                queue.append((f"{path}.{key}" if path else str(key), child))
    return None


def _storable(value: Any) -> Any:
    if found := find_unstorable(value):
        where, reason = found
        raise ValueError(f"{reason} at {where}" if where else reason)
    return value


# Text and JSON that PostgreSQL can store: anything else is refused with the field's name.
Text = Annotated[str, AfterValidator(_storable)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_storable)]


class FieldError(ValueError):
    """A request error tied to one field; rendered as a 4xx whose message names the field."""

    def __init__(self, field: str, message: str, status_code: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status_code = status_code


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Text


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[Text | list[ChatMessage]] = Field(
        description="Plain strings, or chat messages ending with a user turn."
    )
    constitution: str = Field(min_length=1, max_length=64)
    revisions: int | None = Field(
        None, ge=1, description="Critique-and-revise rounds (default: the constitution's)."
    )
    sampling: SamplingRequest | None = None
    model: str | None = Field(None, description="Default model, or `train:<id>` for a trained one.")
    metadata: JsonObject = Field(default_factory=dict)


def normalize_prompts(
    prompts: list[str | list[ChatMessage]], settings: Settings
) -> list[list[dict[str, str]]]:
    """Check every prompt against the limits and turn it into a list of chat messages."""
    if not prompts:
        raise FieldError("prompts", "at least one prompt is required")
    if len(prompts) > settings.max_prompts_per_request:
        raise FieldError(
            "prompts", f"{len(prompts)} prompts; at most {settings.max_prompts_per_request} per request", 413
        )
    normalized = []
    for index, prompt in enumerate(prompts):
        where = f"prompts.{index}"
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [m.model_dump() for m in prompt]
            if not messages:
                raise FieldError(where, "empty message list")
            if len(messages) > settings.max_messages_per_prompt:
                raise FieldError(
                    where, f"{len(messages)} messages; at most {settings.max_messages_per_prompt}"
                )
            if messages[-1]["role"] != "user":
                raise FieldError(f"{where}.{len(messages) - 1}.role", "the last message must be a user turn")
            for n, message in enumerate(messages):
                if message["role"] == "system" and n != 0:
                    raise FieldError(f"{where}.{n}.role", "a system message may only come first")
        for n, message in enumerate(messages):
            if not message["content"].strip() and message["role"] != "system":
                field = where if isinstance(prompt, str) else f"{where}.{n}.content"
                raise FieldError(field, "empty or whitespace-only prompt")
        total = sum(len(m["content"]) for m in messages)
        if total > settings.max_prompt_chars:
            raise FieldError(where, f"{total} characters; at most {settings.max_prompt_chars}")
        normalized.append(messages)
    return normalized


class GenerateResponse(BaseModel):
    job_id: int
    n_prompts: int
    constitution_version: str


class JobOut(BaseModel):
    id: int
    status: str
    constitution: str
    constitution_version: str | None
    model: str
    revisions: int
    sampling: dict[str, Any]
    metadata: dict[str, Any]
    n_prompts: int
    counts: dict[str, int]
    pairs_per_s: float | None
    eta_s: float | None
    created_at: datetime
    cancelled_at: datetime | None


class PromptOut(BaseModel):
    id: int
    position: int = Field(description="Index of the prompt in the `POST /generate` request.")
    status: str
    attempts: int
    last_error: str | None
    pair_id: int | None
    messages: list[dict[str, Any]]
    started_at: datetime | None
    finished_at: datetime | None


class PromptPage(BaseModel):
    items: list[PromptOut]
    next_cursor: str | None


class PairOut(BaseModel):
    id: int
    job_id: int | None
    prompt_id: int | None
    source: str
    constitution: str | None
    constitution_version: str | None
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str
    flags: list[str]
    model: str | None
    created_at: datetime
    principles: list[str] = Field(default_factory=list)
    trajectory: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class PairPage(BaseModel):
    items: list[PairOut]
    next_cursor: str | None


class ConstitutionOut(BaseModel):
    name: str
    version: str
    description: str
    body: str | None = None
    spec: dict[str, Any] | None = None
    versions: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = Field(
        None, description="Set when the file on disk is invalid (last good version served)."
    )


class WorkerOut(BaseModel):
    id: str
    kind: str
    host: str
    pid: int
    model: str | None
    in_flight: int
    tokens_per_s: float
    stats: dict[str, Any]
    started_at: datetime
    heartbeat_at: datetime


# --- training -------------------------------------------------------------------------------------


class DatasetFilter(BaseModel):
    """Which pairs a training job uses: the filters of `GET /export`."""

    model_config = ConfigDict(extra="forbid")

    job_id: DbId | None = None
    constitution: Text | None = Field(None, max_length=64)
    constitution_version: Text | None = Field(None, min_length=8, max_length=64)
    since: datetime | None = None
    include_flagged: bool = False
    source: Text | None = Field(None, max_length=200)
    import_id: DbId | None = None


class TrainRequest(TrainParams):
    """`POST /train`: the base model, the data, and the hyperparameters at top level."""

    base_model: str | None = Field(
        None, description="Default: the bundled model; or `train:<id>` to continue."
    )
    dataset: DatasetFilter = Field(default_factory=DatasetFilter)

    def params(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"base_model", "dataset"})


class TrainPolicyIn(BaseModel):
    """An automatic training policy: a job once `min_new_pairs` new unflagged pairs exist."""

    model_config = ConfigDict(extra="forbid")

    min_new_pairs: int = Field(ge=1, le=2**31 - 1)
    base_model: str | None = None
    enabled: bool = True
    params: TrainParams = Field(default_factory=TrainParams)

    def db_values(self) -> dict[str, Any]:
        return {
            "min_new_pairs": self.min_new_pairs,
            "base_model": self.base_model,
            "enabled": self.enabled,
            "params": self.params.model_dump(mode="json"),
        }


class TrainJobOut(BaseModel):
    id: int
    status: str
    base_model: str
    dataset: dict[str, Any]
    params: dict[str, Any]
    policy: str | None
    n_train_pairs: int | None
    n_eval_pairs: int | None
    step: int
    total_steps: int | None
    eta_s: float | None
    latest_metrics: dict[str, Any] | None
    eval_before: dict[str, Any] | None
    eval_after: dict[str, Any] | None
    artifact: str | None
    model: str | None = Field(description="Use as `model` in POST /generate once succeeded.")
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
