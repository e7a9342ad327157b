"""What every scorer answers, and the pure arithmetic around it: normalising option log-probs,
ensembling, clamping, drawing comparison principles, and ranking responses.

A scorer either compares two responses (`compare`: P(first preferred)) or also scores each one
(`score`: one number per response; None for a judge, which only compares). `rank_responses` turns
either into chosen/rejected indices and P(chosen preferred over rejected).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

Messages = list[dict[str, str]]
T = TypeVar("T")
P = TypeVar("P")

# The CAI paper's chain-of-thought labels are clamped to 40-60%: a reasoned answer is near-certain
# and otherwise overconfident.
CLAMP_LOW, CLAMP_HIGH = 0.4, 0.6


@dataclass
class Comparison:
    """P(first response preferred over second), as a scorer judged it.

    A judge ensembles over its comparison principles and both orders of the options; `details`
    holds one entry per (principle, order): `principle`, `order` ("AB": the first response shown
    as (A); "BA": as (B)), `logprobs` (the raw option-token log-probs), `p` (those normalised over
    the options: p["A"] + p["B"] == 1), `p_first` (P(first) in this order, clamped in
    chain-of-thought mode) and, with chain of thought, `reasoning`. A scorer with scores compares
    by Bradley-Terry on them: no principles, one order, details `[{"scores": [first, second]}]`.
    """

    p_first: float
    principles: list[str]
    orders: int
    details: list[dict[str, Any]] = field(default_factory=list)

    def swapped(self) -> Comparison:
        """The same judgement read the other way round: P(second preferred over first)."""
        details = []
        for detail in self.details:
            flipped = dict(detail)
            if "order" in flipped:
                flipped["order"] = {"AB": "BA", "BA": "AB"}[flipped["order"]]
            if "p_first" in flipped:
                flipped["p_first"] = 1.0 - flipped["p_first"]
            if "scores" in flipped:
                flipped["scores"] = list(reversed(flipped["scores"]))
            details.append(flipped)
        return Comparison(1.0 - self.p_first, list(self.principles), self.orders, details)


@runtime_checkable
class Scorer(Protocol):
    kind: str  # "judge" | "reward_model" | "implicit"
    model: str

    async def compare(self, conversation: Messages, first: str, second: str, *, seed: int) -> Comparison: ...

    async def score(self, conversation: Messages, responses: list[str]) -> list[float] | None: ...


@dataclass
class Ranking:
    """Which of several responses to a prompt is chosen and which rejected."""

    chosen: int
    rejected: int
    scores: list[float] | None  # per response, where the scorer gives scores
    p_chosen: float  # P(chosen preferred over rejected)
    comparison: Comparison | None  # a judge's chosen-vs-rejected comparison
    mean_wins: list[float] | None = None  # a judge's mean win probability per response


# --- pure functions -------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def normalise(logprobs: dict[str, float]) -> dict[str, float]:
    """Option log-probs to probabilities over the options only (a softmax over them).

    Options with no probability at all (-inf) share evenly only when every option has none.
    """
    top = max(logprobs.values())
    if top == -math.inf:
        return {option: 1.0 / len(logprobs) for option in logprobs}
    weights = {option: math.exp(value - top) for option, value in logprobs.items()}
    total = sum(weights.values())
    return {option: weight / total for option, weight in weights.items()}


def clamp(p: float, low: float = CLAMP_LOW, high: float = CLAMP_HIGH) -> float:
    return min(high, max(low, p))


def ensemble(probabilities: Sequence[float]) -> float:
    """The mean of P(first) over principles and orders: a swap of the two responses gives exactly
    1 - the mean, since each order's P(first) is 1 - the other's read of the same prompt."""
    if not probabilities:
        raise ValueError("nothing to ensemble")
    return math.fsum(probabilities) / len(probabilities)


def sample_principles(principles: Sequence[P], k: int, seed: int) -> list[P]:
    """`k` distinct principles drawn with `seed` (all of them, in order, when k >= their number).

    Deterministic in (seed, k): the same comparison asked again, in either order of the responses,
    uses the same principles.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    if k >= len(principles):
        return list(principles)
    rng = random.Random(f"judge-principles:{seed}:{k}")  # a str seed is hashed with sha512: stable
    return rng.sample(list(principles), k)


def derived_seed(*parts: object) -> int:
    """A 31-bit seed from several parts, the same in every process."""
    return random.Random(":".join(str(part) for part in parts)).getrandbits(31)


def rank_order(values: Sequence[float]) -> tuple[int, int]:
    """(best, worst) indices of `values`: ties go to the lower index for best, the higher for worst,
    so that best != worst whenever there are two values or more."""
    if len(values) < 2:
        raise ValueError("ranking needs at least two responses")
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[0], order[-1]


def mean_wins(wins: Sequence[Sequence[float]]) -> list[float]:
    """Each response's mean probability of being preferred over the others; `wins[i][j]` is
    P(i preferred over j) (the diagonal is ignored)."""
    n = len(wins)
    if n < 2:
        raise ValueError("ranking needs at least two responses")
    return [math.fsum(wins[i][j] for j in range(n) if j != i) / (n - 1) for i in range(n)]


def rank_from_wins(wins: Sequence[Sequence[float]]) -> tuple[int, int, list[float]]:
    """(chosen, rejected, mean win probabilities) from a win-probability matrix."""
    means = mean_wins(wins)
    chosen, rejected = rank_order(means)
    return chosen, rejected, means


def all_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def win_matrix(n: int, comparisons: dict[tuple[int, int], Comparison]) -> list[list[float]]:
    """P(i preferred over j) for every i != j from the comparisons of pairs i < j."""
    wins = [[0.5] * n for _ in range(n)]
    for (i, j), comparison in comparisons.items():
        wins[i][j] = comparison.p_first
        wins[j][i] = 1.0 - comparison.p_first
    return wins


# --- ranking -------------------------------------------------------------------------------------


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """`asyncio.gather`, except that a failure cancels the others (and awaits them) before it is
    raised: no request of a failed comparison goes on running in the engine."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def rank_responses(
    scorer: Scorer, conversation: Messages, responses: list[str], *, seed: int
) -> Ranking:
    """Chosen (best) and rejected (worst) of `responses` to `conversation`.

    With scores: chosen = argmax, rejected = argmin, p_chosen = sigmoid(s_c - s_r) (Bradley-Terry).
    With a judge: every pair compared once (concurrently), ranked by mean win probability; p_chosen
    is the chosen-vs-rejected comparison's p_first, from those same comparisons.
    """
    if len(responses) < 2:
        raise ValueError("ranking needs at least two responses")
    scores = await scorer.score(conversation, responses)
    if scores is not None:
        chosen, rejected = rank_order(scores)
        return Ranking(chosen, rejected, list(scores), sigmoid(scores[chosen] - scores[rejected]), None)
    pairs = all_pairs(len(responses))
    results = await gather_all(
        scorer.compare(conversation, responses[i], responses[j], seed=seed) for i, j in pairs
    )
    comparisons = dict(zip(pairs, results, strict=True))
    chosen, rejected, means = rank_from_wins(win_matrix(len(responses), comparisons))
    if chosen < rejected:
        comparison = comparisons[(chosen, rejected)]
    else:
        comparison = comparisons[(rejected, chosen)].swapped()
    return Ranking(chosen, rejected, None, comparison.p_first, comparison, means)
