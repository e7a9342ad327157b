"""Evaluation of a trained model: what is asked for, and the statistics of the answer.

An evaluation compares the trained model with its base model on held-out prompts (both answer,
a judge, or a panel of judges, compares the two answers in both orders: a win rate with its 95%
confidence interval, the win/tie/loss/failed counts, and a length-controlled win rate), and
measures reward accuracy on an imported preference set. The judge is never the trained model: by
default `CAI_JUDGE_MODEL`, else the base model (`judge_models`). A training policy with `promote`
makes its constitution generate with the trained model once at least `CAI_EVAL_MIN_COMPARISONS`
comparisons finished and the length-controlled win rate's lower bound is above 0.5. The statistics
are pure functions here; the work is queued as an `evaluations` row (`core/queue.py`'s EVALUATIONS
kind).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from cai_dpo.core.constitutions import NAME_PATTERN
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.storable import StorableText
from cai_dpo.core.strict_json import StrictJson

# A comparison whose probability is this close to 0.5 is a tie, not a win or a loss.
TIE_BAND = 0.05
Z_95 = 1.959963984540054


# The judge of an evaluation that names none (its model: `default_judge_model`).
DEFAULT_JUDGE = ScorerSpec(kind="judge", k=2)


class EvaluationRequest(StrictJson):
    """`POST /train/{id}/evaluate`, or a training job's `evaluation` parameters."""

    # `_judge_is_a_judge`, stated in the OpenAPI document.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=lambda schema: schema.setdefault("allOf", []).extend(
            [
                {
                    "properties": {
                        "judge": {"properties": {"kind": {"const": "judge"}}},
                        "judges": {
                            "anyOf": [
                                {"type": "null"},
                                {"type": "array", "items": {"properties": {"kind": {"const": "judge"}}}},
                            ]
                        },
                    }
                },
                {  # a panel or one judge, not both
                    "if": {"properties": {"judges": {"type": "array"}}, "required": ["judges"]},
                    "then": {"properties": {"judge": {"type": "null"}}},
                },
            ]
        ),
    )

    prompts: list[StorableText] | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="Held-out prompts for the win rate. Default: the prompts of the job's held-out pairs.",
    )
    max_prompts: int = Field(64, ge=1, le=2000, description="At most this many of the held-out prompts.")
    judge: ScorerSpec | None = Field(
        None,
        description="The judge comparing the answers, both orders (default: `{kind: judge, k: 2}`; its "
        "model by default `CAI_JUDGE_MODEL`, else the base model; never the trained model).",
    )
    judges: list[ScorerSpec] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description="A panel in place of `judge`: each judge compares both orders; P(trained preferred) is "
        "the mean of their probabilities, and each judge's own figure is kept.",
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
        if self.judge is not None and self.judge.kind != "judge":
            raise ValueError("judge.kind: the win rate is judged by a judge")
        if self.judges is not None:
            if self.judge is not None:
                raise ValueError("judges: give `judge` or a panel of `judges`, not both")
            for i, judge in enumerate(self.judges):
                if judge.kind != "judge":
                    raise ValueError(f"judges.{i}.kind: the win rate is judged by a judge")
        return self

    def panel(self) -> list[ScorerSpec]:
        """The judges of this evaluation as asked for (a model of None: the default judge)."""
        return [spec for _, spec in self.judge_fields()]

    def judge_fields(self) -> list[tuple[str, ScorerSpec]]:
        """Each judge with the field that names it (for errors)."""
        if self.judges is None:
            return [("judge.model", self.judge or DEFAULT_JUDGE)]
        return [(f"judges.{i}.model", judge) for i, judge in enumerate(self.judges)]


def default_judge_model(*, trained: str, base: str, configured: str | None) -> str:
    """The judge of an evaluation that names none: `CAI_JUDGE_MODEL` unless that is the trained
    model itself, else the base model. Never the trained model: a judge favours its own answers."""
    return configured if configured and configured != trained else base


def judge_models(
    request: EvaluationRequest, *, trained: str, base: str, configured: str | None
) -> list[ScorerSpec]:
    """The request's judges with every model filled in (`default_judge_model` where none is named);
    a judge naming the trained model is refused (`ValueError` naming the field)."""
    resolved = []
    for field, spec in request.judge_fields():
        if spec.model == trained:
            raise ValueError(f"{field}: {trained} is the model under evaluation; it cannot judge itself")
        model = spec.model or default_judge_model(trained=trained, base=base, configured=configured)
        resolved.append(spec.model_copy(update={"model": model}))
    return resolved


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


@dataclass(frozen=True)
class LengthControlled:
    """The win rate the judge would give at no length difference between the two answers."""

    rate: float  # sigmoid(intercept) of the logistic regression of the preference on length
    ci95: tuple[float, float]  # bootstrap percentile interval (`length_controlled_win_rate`)
    length_coefficient: float  # the regression's slope on tanh(length difference / its sd)
    length_term: bool  # False when every comparison has the same length difference: no slope
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ci95": list(self.ci95)}


BOOTSTRAP_RESAMPLES = 1000
# A weak L2 penalty on the regression's coefficients: finite estimates when the preferences are all
# 0 or 1 (separation), a negligible pull otherwise.
_RIDGE = 1e-2


def _logistic_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intercepts and slopes of `B` weighted logistic regressions of labels in [0, 1] on `x` at
    once (`y`: n, or B x n; `weights`: B x n, e.g. bootstrap counts), by damped Newton steps on the
    penalised likelihood."""
    b = weights.shape[0]
    labels = y if y.ndim == 2 else y[None, :]
    theta, phi = np.zeros(b), np.zeros(b)
    for _ in range(100):
        mu = 1.0 / (1.0 + np.exp(-np.clip(theta[:, None] + phi[:, None] * x[None, :], -30, 30)))
        r = weights * (labels - mu)
        g0, g1 = r.sum(1) - _RIDGE * theta, (r * x).sum(1) - _RIDGE * phi
        s = weights * mu * (1 - mu)
        h00, h01, h11 = s.sum(1) + _RIDGE, (s * x).sum(1), (s * x * x).sum(1) + _RIDGE
        det = h00 * h11 - h01 * h01
        d0, d1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        damp = np.maximum(1.0, np.maximum(np.abs(d0), np.abs(d1)) / 5.0)
        theta, phi = theta + d0 / damp, phi + d1 / damp
        if max(np.abs(d0).max(), np.abs(d1).max()) < 1e-7:
            break
    return theta, phi


def length_controlled_win_rate(
    p_a: Sequence[float],
    length_a: Sequence[float],
    length_b: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> LengthControlled | None:
    """The length-controlled win rate of answer A over answer B, as alpaca_eval computes it: a
    logistic regression of the judge's preference (its probability, a soft label) on
    tanh(length difference / its standard deviation); the rate is sigmoid(intercept), the
    preference predicted at no length difference. Its 95% interval is a bootstrap percentile
    interval: each of `resamples` resamplings of the comparisons draws every verdict from the
    judge's probability (a judge saying 0.8 picks A four times in five), so a judge whose every
    preference length explains still leaves the sampling error of n verdicts; seeded, the same
    numbers every time. None without comparisons."""
    n = len(p_a)
    if n == 0:
        return None
    y = np.clip(np.asarray(p_a, dtype=float), 0.0, 1.0)
    delta = np.asarray(length_a, dtype=float) - np.asarray(length_b, dtype=float)
    sd = float(delta.std())
    length_term = sd > 0
    x = np.tanh(delta / sd) if length_term else np.zeros(n)
    theta, phi = _logistic_fit(x, y, np.ones((1, n)))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    verdicts = (rng.random((resamples, n)) < y[None, :]).astype(float)
    boot_theta, _ = _logistic_fit(x, verdicts, counts.astype(float))
    low, high = np.quantile(1.0 / (1.0 + np.exp(-boot_theta)), [0.025, 0.975])
    rate = float(1.0 / (1.0 + np.exp(-theta[0])))
    return LengthControlled(
        rate=rate,
        # Drawn verdicts of near-certain preferences meet the weak ridge otherwise than the soft
        # ones: the interval is kept around the estimate.
        ci95=(min(float(low), rate), max(float(high), rate)),
        length_coefficient=float(phi[0]),
        length_term=length_term,
        n=n,
    )


def promotion_decision(
    result: WinRate,
    *,
    length_controlled: LengthControlled | None = None,
    min_comparisons: int = 1,
    failed: int = 0,
) -> tuple[bool, str]:
    """Promote only when the trained model is better with 95% confidence, on at least
    `min_comparisons` finished comparisons: the guard of the loop. With `length_controlled`, that
    figure decides (a judge that likes long answers does not promote a verbose model)."""
    counts = f"{result.n} comparisons finished, {failed} failed"
    if result.n == 0:
        return False, f"no comparison finished ({failed} failed)"
    if result.n < min_comparisons:
        return False, f"{counts}: fewer than the minimum {min_comparisons} (CAI_EVAL_MIN_COMPARISONS)"
    if length_controlled is not None:
        name, rate, (low, high) = "length-controlled win rate", length_controlled.rate, length_controlled.ci95
        raw = f" (raw win rate {result.rate:.3f}); {counts}"
    else:
        name, rate, (low, high), raw = "win rate", result.rate, result.ci95, f"; {counts}"
    figure = f"{name} {rate:.3f}, 95% interval [{low:.3f}, {high:.3f}]"
    if low > 0.5:
        return True, f"{figure} above 0.5{raw}"
    return False, f"{figure} does not exclude 0.5{raw}"


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
