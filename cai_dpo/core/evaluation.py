"""Evaluation of a trained model: what is asked for, and the statistics of the answer.

An evaluation compares the trained model with its base model on held-out prompts (both answer,
a judge compares the two answers in both orders: a win rate with its 95% confidence interval and
the win/tie/loss counts), and measures reward accuracy on an imported preference set. A training
policy with `promote` makes its constitution generate with the trained model once the win rate's
lower bound is above 0.5. The statistics are pure functions here; the work is queued as an
`evaluations` row (`core/queue.py`'s EVALUATIONS kind).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from cai_dpo.core.constitutions import NAME_PATTERN
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.storable import StorableText
from cai_dpo.core.strict_json import StrictJson

# A comparison whose probability is this close to 0.5 is a tie, not a win or a loss.
TIE_BAND = 0.05
Z_95 = 1.959963984540054


class EvaluationRequest(StrictJson):
    """`POST /train/{id}/evaluate`, or a training job's `evaluation` parameters."""

    # `_judge_is_a_judge`, stated in the OpenAPI document.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=lambda schema: schema.setdefault("allOf", []).append(
            {"properties": {"judge": {"properties": {"kind": {"const": "judge"}}}}}
        ),
    )

    prompts: list[StorableText] | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="Held-out prompts for the win rate. Default: the prompts of the job's held-out pairs.",
    )
    max_prompts: int = Field(64, ge=1, le=2000, description="At most this many of the held-out prompts.")
    judge: ScorerSpec = Field(
        default_factory=lambda: ScorerSpec(kind="judge", k=2),
        description="The judge comparing the answers (default model: the base model; 2 principles per "
        "comparison, both orders).",
    )
    constitution: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Whose comparison principles the judge asks. Default: the training dataset's "
        "constitution, else `harmless`.",
    )
    max_tokens: int = Field(256, ge=1, le=8192, description="New tokens per answer.")
    external: PairFilter | None = Field(
        None,
        description="An imported preference set (e.g. {'source': 'hh'}): reward accuracy and mean margin "
        "of the base and the trained model on it.",
    )
    max_external_pairs: int = Field(256, ge=1, le=100_000)

    @model_validator(mode="after")
    def _judge_is_a_judge(self) -> EvaluationRequest:
        if self.judge.kind != "judge":
            raise ValueError("judge.kind: the win rate is judged by a judge")
        return self


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int
    n: int
    rate: float  # (wins + ties / 2) / n
    ci95: tuple[float, float]  # Wilson score interval of the rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ci95": list(self.ci95)}


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (ties count as half a success)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(p_trained: list[float], *, tie_band: float = TIE_BAND) -> WinRate:
    """From each prompt's P(trained answer preferred): counts, rate and its 95% interval."""
    wins = sum(p > 0.5 + tie_band for p in p_trained)
    losses = sum(p < 0.5 - tie_band for p in p_trained)
    n = len(p_trained)
    ties = n - wins - losses
    score = wins + ties / 2
    return WinRate(wins, ties, losses, n, score / n if n else 0.0, wilson_interval(score, n))


def promotion_decision(result: WinRate) -> tuple[bool, str]:
    """Promote only when the trained model is better with 95% confidence: the guard of the loop."""
    low, high = result.ci95
    if result.n == 0:
        return False, "no comparison finished"
    if low > 0.5:
        return True, f"win rate {result.rate:.3f}, 95% interval [{low:.3f}, {high:.3f}] above 0.5"
    return False, f"win rate {result.rate:.3f}, 95% interval [{low:.3f}, {high:.3f}] does not exclude 0.5"


def reward_accuracy(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """How often a reward (log-prob, or DPO implicit reward) ranks chosen above rejected, and by how much."""
    n = len(chosen)
    if n == 0:
        return {"accuracy": 0.0, "mean_margin": 0.0, "n": 0}
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "accuracy": sum(m > 0 for m in margins) / n,
        "mean_margin": sum(margins) / n,
        "n": n,
    }
