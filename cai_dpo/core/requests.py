"""What a client asks for, as one typed model per concept from the request to the worker:
`GenerateRequest` (prompts, a constitution, a mode, `SamplingRequest`), `ReviewIn`, `TrainRequest`.
The API validates bodies with them, the console builds them from its forms, and the services
(`core/services.py`) act on them; `normalize_prompts` checks what settings limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from cai_dpo.core.constitutions import NAME_PATTERN
from cai_dpo.core.errors import FieldError
from cai_dpo.core.generation_modes import GenerationMode, SamplingRequest
from cai_dpo.core.model_refs import ModelRef, current_settings
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.settings import Settings
from cai_dpo.core.storable import SchemaPattern, StorableJson, StorableText
from cai_dpo.core.strict_json import StrictJson
from cai_dpo.core.training_params import TrainParams

Role = Literal["system", "user", "assistant"]

# Text with something in it besides whitespace (and no NUL), as `normalize_prompts` checks a prompt.
NONBLANK = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
PromptText = Annotated[StorableText, SchemaPattern(NONBLANK)]


class ChatMessage(StrictJson):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: StorableText


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
    max_generated_tokens: int | None = Field(
        None,
        ge=1,
        le=2**62,
        description="The job's budget: once its pairs have generated this many tokens, its "
        "unclaimed prompts are cancelled (`budget: max_generated_tokens N reached`); prompts "
        "already running finish, so the job may end a little past it.",
    )

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
