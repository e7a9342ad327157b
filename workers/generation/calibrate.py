"""A judge's calibration pair (`CalibrateOptions`): the judge, or each judge of a panel, compares a
stored human-labelled pair's chosen and rejected answers in both orders; the result is a
`comparisons` row (a = chosen) with P(chosen preferred) per order kept for the position bias
(`core/calibration.py` summarises)."""

from __future__ import annotations

import math
from typing import Any

from cai_dpo.core.calibration import CHOSEN, REJECTED
from workers.generation.modes import finite
from workers.generation.trajectory import request_seed
from workers.scoring import Scorer
from workers.scoring.base import gather_all


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


async def judge_pair(
    judges: list[Scorer],
    *,
    messages: list[dict[str, str]],
    chosen: str,
    rejected: str,
    pair_id: int,
    seed: int,
) -> dict[str, Any]:
    """The `comparisons` columns of one calibration pair: P(chosen preferred) over both orders and
    the panel (`p_a`), and per order in `preference` (`p_chosen_first`: chosen shown as (A))."""
    principle_seed = request_seed(seed, pair_id, "judge") or 0
    comparisons = await gather_all(
        judge.compare(messages, chosen, rejected, seed=principle_seed) for judge in judges
    )
    per_judge = []
    for judge, comparison in zip(judges, comparisons, strict=True):
        by_order = {
            order: [d["p_first"] for d in comparison.details if d.get("order") == order]
            for order in ("AB", "BA")
        }
        per_judge.append(
            {
                "model": judge.model,
                "p_a": comparison.p_first,
                # A scorer without orders (none in a calibration: judges only) reads the same both ways.
                "p_chosen_first": _mean(by_order["AB"]) if by_order["AB"] else comparison.p_first,
                "p_chosen_second": _mean(by_order["BA"]) if by_order["BA"] else comparison.p_first,
                "principles": comparison.principles,
                "details": finite(comparison.details),
            }
        )
    return {
        "model_a": CHOSEN,
        "model_b": REJECTED,
        "answer_a": chosen,
        "answer_b": rejected,
        "p_a": _mean([j["p_a"] for j in per_judge]),
        "length_a": len(chosen),
        "length_b": len(rejected),
        "judges": [{"model": j["model"], "p_a": j["p_a"]} for j in per_judge],
        "preference": {
            "pair_id": pair_id,
            "judge": judges[0].model if len(judges) == 1 else [judge.model for judge in judges],
            "p_chosen_first": _mean([j["p_chosen_first"] for j in per_judge]),
            "p_chosen_second": _mean([j["p_chosen_second"] for j in per_judge]),
            "judges": per_judge,
            "length_unit": "characters",
        },
    }
