"""A scripted engine for unit tests of the loop's bookkeeping (never in place of the real vLLM tests)."""

from __future__ import annotations

import asyncio
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
    ):
        self.model = model
        self.reply = reply or (lambda messages: f"answer to: {messages[-1]['content'][:40]}")
        self.too_long_marker = too_long_marker
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

    def stats(self) -> EngineStats:
        return EngineStats(requests=len(self.calls), completion_tokens=self.completion_tokens)

    async def refresh_stats(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.started = False
