"""The three ways a prompt becomes a pair (`GenerationMode`), each a function from a prompt to a
`PairDraft`: what the worker stores, scores and preference included.

- `revise_pair`: the critique-and-revise trajectory; with a verifier, the revision is compared
  with the first answer and the pair flagged `not_improved` where the scorer prefers the original;
  a judge verifier also compares them under a helpfulness principle (the helpfulness guard) and
  flags `less_helpful` a revision that loses it without being clearly less harmful. Where the
  constitution's no-harm check found nothing to critique and kept the first answer, the pair is
  that answer twice, flagged `no_harm_found`, and nothing is verified.
- `ranked_pair` (`ai_feedback`, `best_of_n`): `n` answers sampled at once (one continuous batch),
  ranked by the scorer; the most preferred is chosen, the least preferred rejected; flagged
  `inconsistent` where the scorer's own chosen-vs-rejected comparison prefers the rejected one.

Besides `quality_flags`, a revision is checked for text copied from the constitution
(`copies_example`) and for a critique given in place of a revision (`meta_revision`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from cai_dpo.core.constitutions import ConstitutionSpec
from cai_dpo.core.pair_flags import (
    copies_example,
    example_texts,
    inconsistent,
    less_helpful,
    meta_revision,
)
from workers.generation.engines import ChatResult, Engine, Sampling
from workers.generation.trajectory import (
    answer_text,
    quality_flags,
    request_seed,
    run_trajectory,
)
from workers.scoring import Judge, Ranking, Scorer, rank_responses
from workers.scoring.base import gather_all

Message = dict[str, str]

# p_chosen is kept off 0 and 1 so that its log-odds (the margin) stays finite.
_P_EPSILON = 1e-6


@dataclass
class PairDraft:
    """A pair before it is stored: the columns `complete_prompt` inserts (less job bookkeeping)."""

    chosen: str
    rejected: str
    trajectory: dict[str, Any]
    flags: list[str]
    usage: dict[str, int]
    scores: dict[str, float] | None = None
    preference: dict[str, Any] | None = None
    scorer: str | None = None
    margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "rejected": self.rejected,
            "trajectory": self.trajectory,
            "flags": self.flags,
            "usage": self.usage,
            "scores": self.scores,
            "preference": self.preference,
            "scorer": self.scorer,
            "margin": self.margin,
        }


def finite(value: Any) -> Any:
    """JSON PostgreSQL can store: a log-prob of -inf (an option the model gives no chance) is None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def log_odds(p: float) -> float:
    p = min(max(p, _P_EPSILON), 1 - _P_EPSILON)
    return math.log(p / (1 - p))


def revision_flags(spec: ConstitutionSpec, messages: list[Message], chosen: str) -> list[str]:
    """The content flags of a critique-and-revise pair (`cai_dpo.core.pair_flags`)."""
    prompt = "\n".join(str(m.get("content", "")) for m in messages)
    flags = []
    if copies_example(chosen, sources=example_texts(spec), prompt=prompt):
        flags.append("copies_example")
    if meta_revision(chosen, prompt=prompt):
        flags.append("meta_revision")
    return flags


def judged(draft: PairDraft, ranking: Ranking, scorer: Scorer, *, chosen: int, rejected: int) -> PairDraft:
    """Record how `scorer` judged responses `chosen` vs `rejected` (indices into what it ranked)."""
    # The ranking's own chosen/rejected may be the other way round (verify keeps the revision as
    # chosen whatever the scorer thinks): turn its probability to the pair's orientation.
    same_way = (ranking.chosen, ranking.rejected) == (chosen, rejected)
    p_chosen = ranking.p_chosen if same_way else 1.0 - ranking.p_chosen
    if ranking.scores is not None:
        draft.scores = {"chosen": ranking.scores[chosen], "rejected": ranking.scores[rejected]}
    comparison = ranking.comparison
    draft.preference = {
        "p_chosen": p_chosen,
        "scorer": scorer.kind,
        "model": scorer.model,
        "principles": comparison.principles if comparison else [],
        "orders": comparison.orders if comparison else 1,
    }
    draft.scorer = scorer.kind
    # The log-odds of the preference; with scores it is their difference exactly (Bradley-Terry),
    # without the rounding of going through a probability.
    draft.margin = (
        draft.scores["chosen"] - draft.scores["rejected"] if draft.scores is not None else log_odds(p_chosen)
    )
    return draft


async def revise_pair(
    engine: Engine,
    *,
    spec: ConstitutionSpec,
    prompt_id: int,
    messages: list[Message],
    revisions: int,
    sampling: Sampling,
    few_shot: list[Message],
    request_prefix: str,
    verifier: Scorer | None,
) -> PairDraft:
    trajectory = await run_trajectory(
        engine,
        spec=spec,
        prompt_id=prompt_id,
        prompt=messages,
        revisions=revisions,
        sampling=sampling,
        few_shot=few_shot,
        request_prefix=request_prefix,
    )
    if trajectory.no_harm == "kept":
        # Nothing to critique: the first answer stands. One row per done prompt (the job's counts,
        # exports and training all rest on it), flagged so that no export or training takes it.
        flags = quality_flags(
            rejected=trajectory.initial, chosen=trajectory.initial, finish_reasons=trajectory.finish_reasons
        )
        return PairDraft(
            chosen=trajectory.initial,
            rejected=trajectory.initial,
            trajectory=finite(trajectory.to_record()) | {"mode": "revise"},
            flags=["no_harm_found", *(flag for flag in flags if flag != "unchanged")],
            usage=trajectory.usage,
        )
    draft = PairDraft(
        chosen=trajectory.chosen,
        rejected=trajectory.initial,
        trajectory=finite(trajectory.to_record()) | {"mode": "revise"},
        flags=quality_flags(
            rejected=trajectory.initial, chosen=trajectory.chosen, finish_reasons=trajectory.finish_reasons
        )
        + (revision_flags(spec, messages, trajectory.chosen) if trajectory.rounds else []),
        usage=trajectory.usage,
    )
    if verifier is None:
        return draft
    ranking = await rank_responses(
        verifier, messages, [trajectory.chosen, trajectory.initial], seed=_scoring_seed(sampling, prompt_id)
    )
    judged(draft, ranking, verifier, chosen=0, rejected=1)
    if draft.preference["p_chosen"] < 0.5:
        draft.flags.append("not_improved")
    if isinstance(verifier, Judge):
        # The helpfulness guard: a harmlessness judge happy with a lecture in place of an answer.
        principle = spec.helpfulness_principle()
        helpful = await verifier.asking(principle).compare(
            messages, trajectory.chosen, trajectory.initial, seed=_scoring_seed(sampling, prompt_id)
        )
        draft.preference["helpfulness"] = {"p_chosen": helpful.p_first, "principle": principle.id}
        if less_helpful(helpful.p_first, draft.preference["p_chosen"]):
            draft.flags.append("less_helpful")
    return draft


async def ranked_pair(
    engine: Engine,
    *,
    mode: str,
    n: int,
    prompt_id: int,
    messages: list[Message],
    sampling: Sampling,
    request_prefix: str,
    scorer: Scorer,
) -> PairDraft:
    """`n` answers to the prompt, ranked by the scorer: the best is chosen, the worst rejected."""

    async def sample(i: int) -> ChatResult:
        seeded = sampling.model_copy(update={"seed": request_seed(sampling.seed, prompt_id, f"sample{i}")})
        return await engine.chat(messages, seeded, request_id=f"{request_prefix}p{prompt_id}-sample{i}")

    results = await asyncio.gather(*(sample(i) for i in range(n)))
    answers = [answer_text(r) for r in results]
    ranking = await rank_responses(scorer, messages, answers, seed=_scoring_seed(sampling, prompt_id))
    chosen, rejected = ranking.chosen, ranking.rejected
    usage = {
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "completion_tokens": sum(r.completion_tokens for r in results),
        "cached_tokens": sum(r.cached_tokens or 0 for r in results),
    }
    finish_reasons = {"initial": results[rejected].finish_reason, "final": results[chosen].finish_reason}
    draft = PairDraft(
        chosen=answers[chosen],
        rejected=answers[rejected],
        trajectory={
            "mode": mode,
            "samples": [
                {"text": text, "finish_reason": r.finish_reason}
                for text, r in zip(answers, results, strict=True)
            ],
            "chosen_index": chosen,
            "rejected_index": rejected,
            "scores": ranking.scores,
            "principles": [],
        },
        flags=quality_flags(
            rejected=answers[rejected], chosen=answers[chosen], finish_reasons=finish_reasons
        ),
        usage=usage,
    )
    judged(draft, ranking, scorer, chosen=chosen, rejected=rejected)
    if inconsistent(draft.preference["p_chosen"], draft.margin):
        draft.flags.append("inconsistent")
    return draft


async def compare_models(
    engine: Engine,
    baseline: Engine,
    judges: Scorer | list[Scorer],
    *,
    prompt_id: int,
    messages: list[Message],
    sampling: Sampling,
    request_prefix: str,
) -> dict[str, Any]:
    """Both models answer the prompt (the same seed), the judges compare: model A is `engine`'s.

    Each judge of a panel asks both orders; P(A preferred) is the mean of the judges'
    probabilities, each judge's own kept (`judges`). Lengths are the answers' characters."""
    panel = judges if isinstance(judges, list) else [judges]
    seeded = sampling.model_copy(update={"seed": request_seed(sampling.seed, prompt_id, "answer")})
    answers = await asyncio.gather(
        engine.chat(messages, seeded, request_id=f"{request_prefix}p{prompt_id}-a"),
        baseline.chat(messages, seeded, request_id=f"{request_prefix}p{prompt_id}-b"),
    )
    answer_a, answer_b = (answer_text(r) for r in answers)
    seed = _scoring_seed(sampling, prompt_id)
    comparisons = await gather_all(judge.compare(messages, answer_a, answer_b, seed=seed) for judge in panel)
    per_judge = [
        {
            "model": judge.model,
            "p_a": comparison.p_first,
            "principles": comparison.principles,
            "orders": comparison.orders,
            "details": finite(comparison.details),
        }
        for judge, comparison in zip(panel, comparisons, strict=True)
    ]
    return {
        "answer_a": answer_a,
        "answer_b": answer_b,
        "p_a": math.fsum(c.p_first for c in comparisons) / len(comparisons),
        "length_a": len(answer_a),
        "length_b": len(answer_b),
        "judges": [{"model": j["model"], "p_a": j["p_a"]} for j in per_judge],
        "preference": {
            "judge": panel[0].model if len(panel) == 1 else [judge.model for judge in panel],
            "judges": per_judge,
            "finish_reasons": [r.finish_reason for r in answers],
            "completion_tokens": [r.completion_tokens for r in answers],
            "length_unit": "characters",
        },
    }


def _scoring_seed(sampling: Sampling, prompt_id: int) -> int:
    """The judge's principle draw: from the job's seed and the prompt, so a rerun draws the same."""
    return request_seed(sampling.seed if sampling.seed is not None else 0, prompt_id, "judge") or 0
