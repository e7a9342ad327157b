"""The AI-feedback judge of the Constitutional AI paper's RL-CAI stage, on a chat engine.

The feedback model reads the conversation and two candidate responses as a multiple-choice question
under a comparison principle, as one user turn in its chat template; its answer is started for it
("The better response is (") so that the next token is the option's letter. The probability of
each option is read from the log-probs of the tokens `A` and `B` at that position, normalised over
the two, never from parsed text. Each comparison is asked in both orders (the responses swapped as
(A) and (B): models favour a position) and under `k` principles drawn from the constitution's
`feedback.principles` with the seed; P(first preferred) is the mean over all of them.

With `chain_of_thought`, the model first writes a short reasoning after "Let me compare them step by
step:", then the answer is started after it; as the paper did, each such probability is clamped to
0.4..0.6 (reasoned answers are near-certain, and overconfident).

Judge requests go to the engine that generates (`Engine` plus `option_logprobs`/`continue_chat`),
so they share its continuous batch and prefix cache.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cai_dpo.core.constitutions import DEFAULT_COMPARISON, ComparisonPrinciple, ConstitutionSpec
from workers.generation.engines import ChatResult, Sampling
from workers.scoring.base import (
    Comparison,
    Messages,
    clamp,
    derived_seed,
    ensemble,
    gather_all,
    normalise,
    sample_principles,
)

OPTIONS = ["A", "B"]
INTRO = "Here is a conversation between a human and an AI assistant:"
ANSWER_PREFIX = "The better response is ("
COT_PREFIX = "Let me compare them step by step:"
COT_ANSWER = "\n\nSo the better response is ("
SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}
# Chain of thought: a short sampled reasoning (seeded per principle and order).
REASONING_SAMPLING = Sampling(temperature=0.7, top_p=0.95, max_tokens=256)


class JudgeEngine(Protocol):
    """What the judge needs of an engine (both engines in generation.engines have it)."""

    model: str

    async def option_logprobs(
        self, messages: Messages, assistant_prefix: str, options: list[str], request_id: str
    ) -> dict[str, float]: ...

    async def continue_chat(
        self, messages: Messages, assistant_prefix: str, sampling: Sampling, request_id: str
    ) -> ChatResult: ...


def render_conversation(conversation: Messages) -> str:
    """The prompt's messages as "Human: ..." / "Assistant: ..." paragraphs."""
    return "\n\n".join(
        f"{SPEAKERS.get(message['role'], message['role'].title())}: {message['content'].strip()}"
        for message in conversation
    )


def judge_messages(conversation: Messages, question: str, option_a: str, option_b: str) -> Messages:
    """The multiple-choice question as the feedback model's one user turn."""
    text = (
        f"{INTRO}\n\n{render_conversation(conversation)}\n\n{question.strip()}\n"
        f"Options:\n(A) {option_a.strip()}\n(B) {option_b.strip()}"
    )
    return [{"role": "user", "content": text}]


def cot_answer_prefix(reasoning: str) -> str:
    """The assistant turn after its reasoning, up to the option's letter."""
    return f"{COT_PREFIX} {reasoning.strip()}{COT_ANSWER}"


class Judge:
    """A `Scorer` of kind `judge`: compares two responses; gives no scores.

    `engine` is a started engine, or an async callable that returns one (called once, on first
    use). `constitution` supplies the comparison principles (`feedback.principles`; without them
    the default principle); `k` of them are asked per comparison.
    """

    kind = "judge"

    def __init__(
        self,
        engine: JudgeEngine | Callable[[], Awaitable[JudgeEngine]],
        constitution: ConstitutionSpec | None = None,
        *,
        k: int = 1,
        chain_of_thought: bool = False,
        model: str | None = None,
        reasoning_sampling: Sampling = REASONING_SAMPLING,
    ) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        if callable(engine) and not hasattr(engine, "option_logprobs"):
            self._engine: JudgeEngine | None = None
            self._engine_for: Callable[[], Awaitable[JudgeEngine]] | None = engine
        else:
            self._engine, self._engine_for = engine, None  # type: ignore[assignment]
        self.model = model or (self._engine.model if self._engine is not None else "")
        self.principles: list[ComparisonPrinciple] = (
            constitution.comparison_principles() if constitution is not None else [DEFAULT_COMPARISON]
        )
        self.k = k
        self.chain_of_thought = chain_of_thought
        self.reasoning_sampling = reasoning_sampling

    async def engine(self) -> JudgeEngine:
        if self._engine is None:
            assert self._engine_for is not None
            engine = self._engine_for()
            self._engine = await engine if inspect.isawaitable(engine) else engine
            self.model = self.model or self._engine.model
        return self._engine

    def asking(self, principle: ComparisonPrinciple) -> Judge:
        """This judge (its engine, model and chain of thought) asking `principle` alone."""
        other = copy.copy(self)
        other.principles, other.k = [principle], 1
        return other

    async def score(self, conversation: Messages, responses: list[str]) -> None:
        return None

    async def compare(self, conversation: Messages, first: str, second: str, *, seed: int) -> Comparison:
        principles = sample_principles(self.principles, self.k, seed)
        engine = await self.engine()
        details = await gather_all(
            self._ask(engine, conversation, principle, first, second, order, seed)
            for principle in principles
            for order in ("AB", "BA")
        )
        p_first = ensemble([detail["p_first"] for detail in details])
        return Comparison(p_first, [p.id for p in principles], 2, details)

    async def _ask(
        self,
        engine: JudgeEngine,
        conversation: Messages,
        principle: ComparisonPrinciple,
        first: str,
        second: str,
        order: str,
        seed: int,
    ) -> dict[str, Any]:
        option_a, option_b = (first, second) if order == "AB" else (second, first)
        messages = judge_messages(conversation, principle.question, option_a, option_b)
        request_id = f"judge-{principle.id}-{order}"
        detail: dict[str, Any] = {"principle": principle.id, "order": order}
        prefix = ANSWER_PREFIX
        if self.chain_of_thought:
            sampling = self.reasoning_sampling.model_copy(
                update={"seed": derived_seed("judge-reasoning", seed, principle.id, order)}
            )
            reasoning = await engine.continue_chat(messages, COT_PREFIX, sampling, f"{request_id}-reason")
            detail["reasoning"] = reasoning.text
            prefix = cot_answer_prefix(reasoning.text)
        logprobs = await engine.option_logprobs(messages, prefix, OPTIONS, request_id)
        p = normalise(logprobs)
        p_first = p["A"] if order == "AB" else p["B"]
        if self.chain_of_thought:
            p_first = clamp(p_first)
        return detail | {"logprobs": logprobs, "p": p, "p_first": p_first}
