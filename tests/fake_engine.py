"""A scripted engine for unit tests of the loop's bookkeeping (never in place of the real vLLM tests)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from workers.generation.engines import ChatResult, EngineStats, PromptTooLong, Sampling


class ScriptedEngine:
    """Answers each chat with `reply(messages)`; can block on a gate and fail chosen prompts."""

    on_cpu = True  # like the CPU engine of the tests: no batch size to size in-flight by

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        reply: Callable[[list[dict[str, str]]], str] | None = None,
        *,
        too_long_marker: str = "TOO LONG",
        check: Callable[[list[dict[str, str]]], float] | None = None,
    ):
        self.model = model
        self.reply = reply or (lambda messages: f"answer to: {messages[-1]['content'][:40]}")
        self.too_long_marker = too_long_marker
        # A no-harm check's P((A) Yes) (constitutions' `no_harm`): by default there is something to
        # critique, so a constitution with a check revises as one without does.
        self.check = check or (lambda messages: 0.9)
        self.checks: list[tuple[str, list[dict[str, str]]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[tuple[str, list[dict[str, str]]]] = []
        self.completion_tokens = 0
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def chat(self, messages: list[dict[str, str]], sampling: Sampling, request_id: str) -> ChatResult:
        self.calls.append((request_id, messages))
        if any(self.too_long_marker in m["content"] for m in messages):
            raise PromptTooLong("conversation of 99999 tokens does not fit the 2048-token context")
        await self.gate.wait()
        text = self.reply(messages)
        self.completion_tokens += len(text.split())
        return ChatResult(
            text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=len(text.split())
        )

    async def option_logprobs(self, messages, assistant_prefix, options, request_id) -> dict[str, float]:
        """A one-token multiple choice (A)/(B): the no-harm check's, answered by `check`."""
        self.checks.append((request_id, messages))
        p = min(max(self.check(messages), 1e-9), 1 - 1e-9)
        return {"A": math.log(p), "B": math.log(1 - p)}

    def stats(self) -> EngineStats:
        return EngineStats(requests=len(self.calls), completion_tokens=self.completion_tokens)

    async def refresh_stats(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.started = False
