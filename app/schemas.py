"""Pydantic models at the HTTP edge: request bodies and response shapes.

Limits that come from settings (prompt count, prompt length) are checked by
`normalize_prompts`, which raises `FieldError` naming the offending field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cai_dpo.core.constitutions import NAME_PATTERN
from cai_dpo.core.generation_modes import GenerationMode
from cai_dpo.core.model_refs import ModelRef, current_settings
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.settings import Settings
from cai_dpo.core.storable import SchemaPattern, StorableJson, StorableText
from cai_dpo.core.strict_json import StrictJson
from cai_dpo.core.training_params import TrainParams  # pydantic only: the API never imports torch

Role = Literal["system", "user", "assistant"]

# Text with something in it besides whitespace (and no NUL), as `normalize_prompts` checks a prompt.
NONBLANK = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
PromptText = Annotated[StorableText, SchemaPattern(NONBLANK)]

# A `next_cursor`: the last id of the previous page.
Cursor = Annotated[str, Field(pattern=r"^\d{1,18}$", description="`next_cursor` of the previous page.")]


class FieldError(ValueError):
    """A request error tied to one field; rendered as a 4xx whose message names the field."""

    def __init__(self, field: str, message: str, status_code: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status_code = status_code


class ErrorItem(BaseModel):
    field: str = Field(
        description="Where the fault is: a body field (`prompts.3.content`), a parameter (`job_id`), "
        "a header (`authorization`, `content-type`), or `body` as a whole."
    )
    message: str
    line: int | None = Field(None, description="`POST /datasets/import`: the upload's line at fault.")


class ErrorBody(BaseModel):
    """Every error response (4xx, 5xx): `detail` is the first error as `<field>: <message>`, `errors`
    lists them all. An invalid constitution adds `file` and `line` (the YAML line at fault)."""

    model_config = ConfigDict(extra="allow")

    detail: str
    errors: list[ErrorItem] = Field(min_length=1)


class ChatMessage(StrictJson):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: StorableText


class SamplingRequest(StrictJson):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class TooManyPrompts(Exception):
    """Not a ValueError on purpose: pydantic lets it through, so validation stops at once (413)."""

    def __init__(self, count: int, limit: int):
        self.count, self.limit = count, limit


class GenerateRequest(GenerationMode):
    """`POST /generate`: prompts, a constitution, and how to make pairs of them (`mode`, `n`,
    `scorer`, `verify`: see `GenerationMode`)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[PromptText | list[ChatMessage]] = Field(
        min_length=1,
        description="Plain strings, or chat messages: a system message only first, the last a user "
        "turn, every user and assistant message with text; at most CAI_MAX_PROMPT_CHARS characters in "
        "all (a prompt's messages together).",
    )
    constitution: str = Field(min_length=1, max_length=64, json_schema_extra={"pattern": NAME_PATTERN})
    revisions: int | None = Field(
        None, ge=1, description="Critique-and-revise rounds (default: the constitution's)."
    )
    sampling: SamplingRequest | None = None
    model: ModelRef | None = Field(None, description="Default model, or `train:<id>` for a trained one.")
    metadata: StorableJson = Field(default_factory=dict)

    def generation_mode(self) -> GenerationMode:
        return GenerationMode.model_validate(self.model_dump(include=set(GenerationMode.model_fields)))

    @field_validator("prompts", mode="before")
    @classmethod
    def _count_first(cls, prompts: Any) -> Any:
        """The count is checked before any prompt is: 100,000 prompts are refused without reading them."""
        settings = current_settings.get()
        if (
            settings is not None
            and isinstance(prompts, list)
            and len(prompts) > settings.max_prompts_per_request
        ):
            raise TooManyPrompts(len(prompts), settings.max_prompts_per_request)
        return prompts


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
    options: dict[str, Any] = Field(description="mode, n, scorer, verify (see POST /generate).")
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


class ReviewIn(StrictJson):
    """`POST /pairs/{id}/review`: approve or reject the pair, optionally with an edited chosen answer."""

    model_config = ConfigDict(
        extra="forbid",
        # `_edit_approves`, stated in the OpenAPI document: a rejection carries no `chosen`.
        json_schema_extra={
            "if": {"properties": {"status": {"const": "rejected"}}, "required": ["status"]},
            "then": {"properties": {"chosen": {"type": "null"}}},
        },
    )

    status: Literal["approved", "rejected"]
    chosen: StorableText | None = Field(
        None,
        min_length=1,
        max_length=200_000,
        description="The reviewer's chosen answer: a new version (approved); the generated text stays.",
    )

    @model_validator(mode="after")
    def _edit_approves(self) -> ReviewIn:
        if self.chosen is not None and self.status != "approved":
            raise ValueError("chosen: an edited answer is approved; reject without `chosen`")
        if self.chosen is not None and not self.chosen.strip():
            raise ValueError("chosen: empty or whitespace-only answer")
        return self


class ReviewOut(BaseModel):
    version: int
    status: Literal["approved", "rejected"]
    reviewer: str = Field(description="The name of the API key that reviewed.")
    created_at: datetime
    chosen: str | None = Field(description="The chosen text in force after this version (None: generated).")
    edited: bool = Field(description="This version changed the chosen text.")


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
    scores: dict[str, float] | None = Field(
        None, description="{chosen, rejected} where a scorer scored them."
    )
    preference: dict[str, Any] | None = Field(
        None, description="p_chosen, scorer, model, principles, orders: how a scorer judged the pair."
    )
    margin: float | None = Field(None, description="log(p_chosen / (1 - p_chosen)).")
    principles: list[str] = Field(default_factory=list)
    trajectory: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    review: Literal["approved", "rejected"] | None = Field(
        None, description="The latest human review; None where no one reviewed the pair."
    )
    reviewed_chosen: str | None = Field(
        None, description="A reviewer's latest edit of `chosen`, used by exports (`chosen` stays as made)."
    )
    reviews: list[ReviewOut] | None = Field(None, description="Every review version, oldest first.")


class PairPageQuery(PairFilter):
    """`GET /pairs`: the filters, and a page."""

    model_config = ConfigDict(strict=False)  # a query string carries text only

    cursor: Cursor | None = None
    limit: int = Field(50, ge=1, description="Rows per page (at most CAI_PAGE_SIZE_MAX).")


class ExportQuery(PairFilter):
    """`GET /export`: the filters, and the file's format, style and split."""

    model_config = ConfigDict(strict=False)  # a query string carries text only

    format: Literal["jsonl", "parquet"] = "jsonl"
    style: Literal["standard", "conversational"] = Field(
        "conversational", description="TRL's standard (strings) or conversational (messages) rows."
    )
    split: Literal["train", "test", "all"] = Field("all", description="Deterministic split by pair id.")
    test_fraction: float = Field(0.1, ge=0, le=1, description="Share of pairs in the test split.")
    metadata: bool = Field(False, description="Add id, constitution, principles, source, flags, ...")


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


class ConstitutionVersionOut(BaseModel):
    name: str
    version: str
    body: str
    first_used_at: datetime


class WorkerOut(BaseModel):
    id: str
    kind: str
    host: str
    pid: int
    model: str | None
    in_flight: int
    tokens_per_s: float
    healthy: bool = Field(description="False while the worker reports a problem (e.g. its engine is down).")
    problem: str | None = None
    stats: dict[str, Any]
    started_at: datetime
    heartbeat_at: datetime


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "error"] = Field(
        description="degraded: a live worker reports a problem, or work waits with no live worker of "
        "its kind; error: no database (503)."
    )
    database: bool
    workers: dict[str, int] | None = Field(None, description="Live workers by kind (absent on error).")
    unhealthy_workers: int | None = Field(None, description="Present when degraded.")
    problems: list[dict[str, Any]] | None = Field(
        None, description="Each unhealthy worker's problem: only to callers with a valid key."
    )
    error: str | None = Field(None, description="The database error: only to callers with a valid key.")


# --- training -------------------------------------------------------------------------------------


class TrainRequest(TrainParams):
    """`POST /train`: the base model, the data, and the hyperparameters at top level."""

    base_model: ModelRef | None = Field(
        None, description="Default: the bundled model; or `train:<id>` to continue."
    )
    dataset: PairFilter = Field(
        default_factory=PairFilter, description="Which pairs: the filters of `GET /export`."
    )

    def params(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"base_model", "dataset"})


class EvaluationOut(BaseModel):
    id: int
    status: str = Field(description="queued, running (reward accuracy), comparing (win rate), done, failed.")
    request: dict[str, Any]
    win_rate: dict[str, Any] | None = Field(
        None,
        description="wins, ties, losses, n, rate = (wins + ties/2) / n, ci95 (Wilson), open and failed "
        "prompts: the trained model against its base, judged in both orders. Live while comparing.",
    )
    reward_accuracy: dict[str, Any] | None = Field(
        None, description="held_out (from training) and external: accuracy and mean margin, base and trained."
    )
    promotion: dict[str, Any] | None = None
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None


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
    evaluation: EvaluationOut | None = Field(
        None, description="The latest evaluation: win rate against the base model, reward accuracy."
    )
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
