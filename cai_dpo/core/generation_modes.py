"""How a generation job makes its pairs: the mode, its scorer, and `verify`, as stored with the job.

- `revise` (default): the critique-and-revise loop; chosen = the final revision, rejected = the
  first answer. With `verify`, a scorer compares the two and the pair is flagged `not_improved`
  where it prefers the original.
- `ai_feedback` (the CAI paper's RL-CAI): `n` answers sampled per prompt, a judge compares them,
  chosen/rejected are the most and least preferred.
- `best_of_n`: `n` answers scored by a reward model (`reward_model` or `implicit`), best is chosen,
  worst rejected.

A scorer is named as `{"kind": "judge" | "reward_model" | "implicit", "model": ..., "k": ...}`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from cai_dpo.core.model_refs import ModelRef
from cai_dpo.core.settings import Settings
from cai_dpo.core.strict_json import StrictJson

ScorerKind = Literal["judge", "reward_model", "implicit"]
Mode = Literal["revise", "ai_feedback", "best_of_n"]


class ScorerSpec(StrictJson):
    # The rules of `_model_where_needed`, stated in the OpenAPI document as JSON Schema can state them.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [
                {
                    "if": {
                        "properties": {"kind": {"enum": ["reward_model", "implicit"]}},
                        "required": ["kind"],
                    },
                    "then": {
                        "required": ["model"],
                        "properties": {
                            "model": {"type": "string"},
                            "k": {"const": 1},
                            "chain_of_thought": {"const": False},
                        },
                    },
                },
                {
                    "if": {"properties": {"kind": {"const": "implicit"}}, "required": ["kind"]},
                    "then": {"properties": {"model": {"type": "string", "pattern": "^train:"}}},
                },
            ]
        },
    )

    kind: ScorerKind
    model: ModelRef | None = Field(
        None,
        description="judge: the feedback model (default: the job's own model); reward_model: a local "
        "Hugging Face sequence-classification folder; implicit: `train:<id>`.",
    )
    k: int = Field(1, ge=1, le=16, description="judge: comparison principles per comparison (an ensemble).")
    chain_of_thought: bool = Field(
        False,
        description="judge: reason first, then answer; probabilities clamped to 0.4..0.6 (the CAI paper).",
    )

    @model_validator(mode="after")
    def _model_where_needed(self) -> ScorerSpec:
        if self.kind != "judge" and self.model is None:
            raise ValueError(f"model: a {self.kind} scorer needs a model")
        if self.kind == "implicit" and self.model is not None and not self.model.startswith("train:"):
            raise ValueError("model: an implicit scorer is a trained model, `train:<id>`")
        if self.kind != "judge" and (self.k != 1 or self.chain_of_thought):
            raise ValueError("k: only a judge takes k and chain_of_thought")
        return self


class VerifySpec(StrictJson):
    model_config = ConfigDict(extra="forbid")

    scorer: ScorerSpec


class GenerationMode(StrictJson):
    """The `mode`, `n`, `scorer` and `verify` of `POST /generate`."""

    # The rules of `_consistent`, stated in the OpenAPI document (no `mode` is revise).
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"mode": {"const": "revise"}}},
                    "then": {"properties": {"scorer": {"type": "null"}}},
                },
                {
                    "if": {
                        "properties": {"mode": {"enum": ["ai_feedback", "best_of_n"]}},
                        "required": ["mode"],
                    },
                    "then": {"properties": {"verify": {"type": "null"}}},
                },
                {
                    "if": {"properties": {"mode": {"const": "ai_feedback"}}, "required": ["mode"]},
                    "then": {
                        "properties": {
                            "scorer": {
                                "anyOf": [{"type": "null"}, {"properties": {"kind": {"const": "judge"}}}]
                            }
                        }
                    },
                },
                {
                    "if": {"properties": {"mode": {"const": "best_of_n"}}, "required": ["mode"]},
                    "then": {
                        "required": ["scorer"],
                        "properties": {
                            "scorer": {
                                "type": "object",
                                "properties": {"kind": {"enum": ["reward_model", "implicit"]}},
                            }
                        },
                    },
                },
            ]
        },
    )

    mode: Mode = "revise"
    n: int = Field(2, ge=2, le=16, description="ai_feedback, best_of_n: answers sampled per prompt.")
    scorer: ScorerSpec | None = Field(
        None, description="ai_feedback: a judge (default: the job's model); best_of_n: required."
    )
    verify: VerifySpec | None = Field(None, description="revise: flag pairs the scorer does not prefer.")

    @model_validator(mode="after")
    def _consistent(self) -> GenerationMode:
        if self.mode == "revise" and self.scorer is not None:
            raise ValueError("scorer: revise takes `verify: {scorer: ...}`, not `scorer`")
        if self.mode != "revise" and self.verify is not None:
            raise ValueError(f"verify: only revise verifies; {self.mode} already ranks its answers")
        if self.mode == "ai_feedback" and self.scorer is not None and self.scorer.kind != "judge":
            raise ValueError("scorer.kind: ai_feedback is judged by a judge; use best_of_n for reward models")
        if self.mode == "best_of_n" and (self.scorer is None or self.scorer.kind == "judge"):
            raise ValueError("scorer: best_of_n needs a reward_model or implicit scorer")
        return self

    def effective_scorer(self) -> ScorerSpec | None:
        """The scorer this job uses, if any (ai_feedback defaults to a judge of the job's model)."""
        if self.mode == "revise":
            return self.verify.scorer if self.verify else None
        return self.scorer or ScorerSpec(kind="judge")


class CompareOptions(StrictJson):
    """An evaluation's comparison job (not a mode of `POST /generate`): the job's model (the trained
    one) and `baseline` answer each prompt, the judge `scorer` compares the two answers."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["compare"] = "compare"
    baseline: str
    scorer: ScorerSpec
    # A panel: every judge compares, P(first) is the mean of theirs (`scorer` is its first).
    judges: list[ScorerSpec] | None = None

    def panel(self) -> list[ScorerSpec]:
        return list(self.judges) if self.judges else [self.scorer]


class CalibrateOptions(StrictJson):
    """A judge's calibration job (`POST /judges/calibrate`, not a mode of `POST /generate`): each
    prompt row is a stored human-labelled pair (`pair_ids[position]` in the job's metadata), the
    judge `scorer` (and each of `judges`) compares its chosen and rejected answers in both orders.
    The job's model is the first judge's."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["calibrate"] = "calibrate"
    scorer: ScorerSpec
    judges: list[ScorerSpec] | None = None

    def panel(self) -> list[ScorerSpec]:
        return list(self.judges) if self.judges else [self.scorer]


class Sampling(StrictJson):
    """How a job's answers are sampled: resolved from the request and the settings when the job is
    made, stored as its dump, read back by the workers and handed to the engine as it is."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    temperature: float = Field(ge=0, le=2)
    top_p: float = Field(gt=0, le=1)
    max_tokens: int = Field(ge=1)
    seed: int | None = Field(None, ge=0, description="Per-request seed (None: unseeded).")


class SamplingRequest(StrictJson):
    """`POST /generate`'s `sampling`: each field left out takes the server's default (`CAI_TEMPERATURE`,
    `CAI_TOP_P`, `CAI_MAX_TOKENS`; no seed)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    def resolve(self, settings: Settings) -> Sampling:
        return Sampling(
            temperature=settings.temperature if self.temperature is None else self.temperature,
            top_p=settings.top_p if self.top_p is None else self.top_p,
            max_tokens=settings.max_tokens if self.max_tokens is None else self.max_tokens,
            seed=self.seed,
        )
