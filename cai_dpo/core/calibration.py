"""A judge measured against people: how often it agrees with human preference labels.

`POST /judges/calibrate` takes imported human-labelled pairs (e.g. HH-RLHF's test pairs,
`/datasets/import?source=hh`), each read as "people preferred `chosen`", and asks the judge (or
each judge of a panel) about every pair in both orders: chosen shown as (A), then as (B). The work
is a generation job of mode `calibrate` (`CalibrateOptions`), one prompt row per pair, claimed by
a worker serving the (first) judge's model; each finished pair is a `comparisons` row with
answer_a = chosen, answer_b = rejected, p_a = P(chosen preferred) (the mean of both orders) and
the per-order probabilities in `preference`. `calibration_summary` turns those rows into the
numbers, a pure function:

- `agreement`: the share of pairs where the judge's P(chosen preferred), averaged over both orders,
  is above 0.5 (+/- the tie band of the win rate, a tie counting half): the judge's accuracy
  against the human label, with its Wilson 95% interval and n. `mean_p_chosen` is the soft figure.
- `position_bias`: of the 2n verdicts (each pair, each order), the share won by the answer shown
  first, with its Wilson interval (over 2n verdicts, two per pair, so somewhat narrow); 0.5 is no
  bias. `consistent` is the share of pairs whose two orders pick the same answer.
- `length_bias`: over the pairs whose answers differ in length, the share where the judge prefers
  the longer answer, next to the share where people did (chosen is longer); `bias` is the
  difference: above 0 the judge favours length more than people do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from cai_dpo.core.constitutions import NAME_PATTERN
from cai_dpo.core.evaluation import TIE_BAND, wilson_interval
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.strict_json import StrictJson

# The comparisons rows of a calibration name these as the "models" compared.
CHOSEN, REJECTED = "human:chosen", "human:rejected"


def _as_panel(value: Any) -> Any:
    """One judge is a panel of one."""
    return [value] if isinstance(value, dict | ScorerSpec) else value


def _one_or_a_panel(schema: dict[str, Any]) -> None:
    """`judge` as the document states it: one judge object, or a list of them (kept as a list)."""
    items = schema.pop("items")
    array = {
        "type": "array",
        "items": items,
        "minItems": schema.pop("minItems"),
        "maxItems": schema.pop("maxItems"),
    }
    schema.pop("type", None)
    schema["anyOf"] = [items, array]


class CalibrationRequest(StrictJson):
    """`POST /judges/calibrate`."""

    # `_judges_are_judges`, stated in the OpenAPI document.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=lambda schema: schema.setdefault("allOf", []).append(
            {
                "properties": {
                    "judge": {
                        "anyOf": [
                            {"type": "object", "properties": {"kind": {"const": "judge"}}},
                            {"type": "array", "items": {"properties": {"kind": {"const": "judge"}}}},
                        ]
                    }
                }
            }
        ),
    )

    judge: Annotated[list[ScorerSpec], BeforeValidator(_as_panel)] = Field(
        default_factory=lambda: [ScorerSpec(kind="judge", k=2)],
        min_length=1,
        max_length=8,
        json_schema_extra=_one_or_a_panel,
        description="The judge to measure (`{kind: judge, model, k}`; its model by default "
        "`CAI_JUDGE_MODEL`, else the server's model), or a list of judges: a panel, whose P(chosen "
        "preferred) is the mean of theirs.",
    )
    pairs: PairFilter = Field(
        default_factory=PairFilter,
        description="Which stored pairs, as `/export` selects them (e.g. {source: hh}); each is read as "
        "people preferring `chosen`.",
    )
    max_pairs: int = Field(256, ge=1, le=5000, description="At most this many of the pairs (in id order).")
    constitution: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Whose comparison principles the judge asks (default: harmless).",
    )

    @model_validator(mode="after")
    def _judges_are_judges(self) -> CalibrationRequest:
        for field, spec in self.judge_fields():
            if spec.kind != "judge":
                raise ValueError(f"{field.removesuffix('.model')}.kind: a calibration measures a judge")
        return self

    def judge_fields(self) -> list[tuple[str, ScorerSpec]]:
        """Each judge with the field that names its model (for errors)."""
        if len(self.judge) == 1:
            return [("judge.model", self.judge[0])]
        return [(f"judge.{i}.model", spec) for i, spec in enumerate(self.judge)]


@dataclass(frozen=True)
class Judged:
    """One calibration pair as judged: P(chosen preferred) with chosen shown first, and shown
    second (each the mean over principles and the panel's judges), and both lengths."""

    p_chosen_first: float
    p_chosen_second: float
    length_chosen: int
    length_rejected: int

    @property
    def p_chosen(self) -> float:
        return (self.p_chosen_first + self.p_chosen_second) / 2


def _share(values: Sequence[float], tie_band: float) -> dict[str, Any]:
    """How many probabilities are above 0.5 (a tie, within the band, counting half), with the
    share's Wilson 95% interval."""
    above = sum(p > 0.5 + tie_band for p in values)
    below = sum(p < 0.5 - tie_band for p in values)
    n = len(values)
    score = above + (n - above - below) / 2
    return {"rate": score / n if n else None, "ci95": list(wilson_interval(score, n)), "n": n}


def calibration_summary(rows: Sequence[Judged], *, tie_band: float = TIE_BAND) -> dict[str, Any]:
    """Agreement with the human label, position bias and length bias of the judged pairs (the
    module's docstring says what each number means)."""
    agreement = _share([row.p_chosen for row in rows], tie_band)
    agreement |= {
        "agree": sum(row.p_chosen > 0.5 + tie_band for row in rows),
        "disagree": sum(row.p_chosen < 0.5 - tie_band for row in rows),
    }
    agreement["ties"] = agreement["n"] - agreement["agree"] - agreement["disagree"]
    # P(the answer shown first wins): chosen first, P(chosen); chosen second, P(rejected).
    first = [row.p_chosen_first for row in rows] + [1 - row.p_chosen_second for row in rows]
    position = _share(first, tie_band) | {"mean_p_first": sum(first) / len(first) if first else None}
    consistent = sum((row.p_chosen_first > 0.5) == (row.p_chosen_second > 0.5) for row in rows)
    differ = [row for row in rows if row.length_chosen != row.length_rejected]
    p_longer = [
        row.p_chosen if row.length_chosen > row.length_rejected else 1 - row.p_chosen for row in differ
    ]
    judge_longer = _share(p_longer, tie_band)
    people_longer = (
        sum(row.length_chosen > row.length_rejected for row in differ) / len(differ) if differ else None
    )
    length = {
        "judge_prefers_longer": judge_longer["rate"],
        "ci95": judge_longer["ci95"],
        "people_prefer_longer": people_longer,
        "bias": judge_longer["rate"] - people_longer if differ else None,
        "n": len(differ),
        "unit": "characters",
    }
    n = len(rows)
    return {
        "agreement": agreement,
        "mean_p_chosen": sum(row.p_chosen for row in rows) / n if n else None,
        "n": n,
        "position_bias": position,
        "consistent": consistent / n if n else None,
        "length_bias": length,
    }
