"""Chat engines behind one small interface: in-process vLLM (`VLLMEngine`) or a remote
OpenAI-compatible server (`OpenAIEngine`).

The critique-and-revise loop calls `chat(messages, sampling, request_id)` and gets text, a finish
reason and token counts, without knowing which engine it has. A conversation that cannot fit the
model's context raises `PromptTooLong` (never retryable); any other failed request raises
`EngineError`, or `EngineUnavailable` when the engine itself is down. Engines are built inside
functions only: vLLM spawns worker processes, which
re-import the entry point, so nothing here starts at import time.

For the AI-feedback judge (`workers.scoring`) both engines also answer
`option_logprobs(messages, assistant_prefix, options, request_id)`: the log-probs of one-token
options (`A`, `B`) as the next token after an assistant turn started with `assistant_prefix`; and
`continue_chat(messages, assistant_prefix, sampling, request_id)`: `chat` with the answer started
by `assistant_prefix` (the judge's chain of thought). They run on the same engine as generation, so
judge requests join the same continuous batch.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import httpx

from cai_dpo.core.settings import Settings

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


@dataclass
class ChatResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


@dataclass(frozen=True)
class EngineStats:
    """Cumulative counters since start; `requests` counts completed chats."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    in_flight: int = 0
    failed: int = 0

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

    async def start(self) -> None: ...

    async def chat(self, messages: Messages, sampling: Sampling, request_id: str) -> ChatResult: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...


class _Counters:
    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.cached_prompt_tokens = self.in_flight = self.failed = 0

    def record(self, result: ChatResult) -> None:
        self.requests += 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.cached_prompt_tokens += result.cached_tokens or 0

    def snapshot(self) -> EngineStats:
        return EngineStats(
            requests=self.requests,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            in_flight=self.in_flight,
            failed=self.failed,
        )


# --- in-process vLLM ---------------------------------------------------------------------------


class VLLMEngine:
    """One `vllm.v1` AsyncLLM in this process; every concurrent `chat` joins its continuous batch.

    A request whose `max_tokens` would run past `max_model_len` is clamped to the room left
    rather than refused: the critique-and-revise conversations grow every round, and a clamped
    answer still comes back with `finish_reason == "length"`, which the pair's quality flags
    catch. This is also what `vllm serve` does, so both engines behave alike. Only a prompt that
    leaves no room for a single token raises `PromptTooLong`, before it reaches the engine.

    `dtype="auto"` keeps the model's dtype, except on a CPU without AVX512-BF16, where bf16 is
    emulated and float32 is several times faster.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        name: str | None = None,
        tensor_parallel_size: int = 1,
        memory_fraction: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        dtype: str = "auto",
    ) -> None:
        self.model = name or str(model_path)
        self.model_path = str(model_path)
        self._tensor_parallel_size = tensor_parallel_size
        self._memory_fraction = memory_fraction
        self._requested_max_model_len = max_model_len
        self._enforce_eager = enforce_eager
        self._kv_cache_memory_bytes = kv_cache_memory_bytes
        self._dtype = dtype
        self.dtype = dtype  # resolved by start()
        self._engine: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._eos_token_id: int | None = None
        self.max_model_len: int = max_model_len or 0
        self._ids = itertools.count()
        self._counters = _Counters()

    async def start(self) -> None:
        if self._engine is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        self.dtype = self._dtype
        if self.dtype == "auto" and on_cpu and not _cpu_has_fast_bf16():
            # Without AVX512-BF16 the bf16 kernels emulate it: float32 measured 4-6x faster here.
            self.dtype = "float32"
        memory_fraction = self._memory_fraction or (0.25 if on_cpu else 0.9)
        enforce_eager = on_cpu if self._enforce_eager is None else self._enforce_eager
        args = AsyncEngineArgs(
            model=self.model_path,
            served_model_name=[self.model],
            tensor_parallel_size=self._tensor_parallel_size,
            gpu_memory_utilization=memory_fraction,
            max_model_len=self._requested_max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,
            kv_cache_memory_bytes=self._kv_cache_memory_bytes,
            dtype=self.dtype,
            # On the CPU a prefill split across engine steps makes vLLM rewind the request's seeded
            # generator with set_offset(), which CPU generators do not have ("CPU Generator does
            # not use offset"): the engine process dies. Whole prefills never rewind. Upstream:
            # vllm-project/vllm PR 10097's thread (the rewind relies on CUDA's Philox offsets);
            # other CPU backends skip the rewind (RBLN-SW/vllm-rbln PR 1025).
            enable_chunked_prefill=False if on_cpu else None,
        )
        started = time.perf_counter()
        # Construction blocks for the whole engine start (process spawn, weights, KV cache);
        # a worker thread keeps this event loop free for heartbeats meanwhile.
        # No local name for the engine: something in vLLM keeps this frame alive, and a local
        # would keep the engine alive past shutdown().
        self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._tokenizer = self._engine.get_tokenizer()
        self._eos_token_id = self._tokenizer.eos_token_id
        self.max_model_len = self._engine.model_config.max_model_len
        log.info(
            "vLLM engine for %s ready in %.1f s (max_model_len %d, dtype %s, %s, eager=%s)",
            self.model,
            time.perf_counter() - started,
            self.max_model_len,
            self.dtype,
            "cpu" if on_cpu else f"gpu memory fraction {memory_fraction}",
            enforce_eager,
        )

    def prompt_token_ids(self, messages: Messages) -> list[int]:
        """The conversation rendered by the model's chat template, ready for its answer."""
        if self._tokenizer is None:
            raise EngineError("the engine is not started")
        return list(
            self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    def prefixed_token_ids(self, messages: Messages, assistant_prefix: str) -> list[int]:
        """The conversation ready for its answer (`prompt_token_ids`), the answer started with
        `assistant_prefix` (its tokens on their own, no special tokens added)."""
        prompt = self.prompt_token_ids(messages)
        if not assistant_prefix:
            return prompt
        return prompt + list(self._tokenizer.encode(assistant_prefix, add_special_tokens=False))

    def option_token_ids(self, assistant_prefix: str, options: list[str]) -> list[int]:
        """The token of each option as the next token after `assistant_prefix`.

        Each option must be exactly one token there: the tokens of prefix + option are the tokens
        of the prefix and one more. Otherwise `OptionNotOneToken` (a read of one token's
        log-prob would not be the option's probability).
        """
        if self._tokenizer is None:
            raise EngineError("the engine is not started")
        return option_token_ids(self._tokenizer, assistant_prefix, options)

    async def chat(self, messages: Messages, sampling: Sampling, request_id: str) -> ChatResult:
        return await self._chat_ids(self.prompt_token_ids(messages), sampling, request_id)

    async def continue_chat(
        self, messages: Messages, assistant_prefix: str, sampling: Sampling, request_id: str
    ) -> ChatResult:
        """`chat`, with the assistant's answer already started by `assistant_prefix` (the text
        returned is what follows it)."""
        return await self._chat_ids(self.prefixed_token_ids(messages, assistant_prefix), sampling, request_id)

    async def option_logprobs(
        self, messages: Messages, assistant_prefix: str, options: list[str], request_id: str
    ) -> dict[str, float]:
        """Log-probs of each one-token option as the next token after `assistant_prefix`.

        Raw log-softmax values over the full vocabulary (vLLM's `logprob_token_ids` with one
        generated token), whatever the sampling settings; not normalised over the options.
        """
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if self._engine is None:
            raise EngineError("the engine is not started")
        ids = self.option_token_ids(assistant_prefix, options)
        prompt_ids = self.prefixed_token_ids(messages, assistant_prefix)
        self._check_room(prompt_ids)
        params = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            logprobs=len(ids),
            logprob_token_ids=ids,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        engine_request_id, final = await self._generate(prompt_ids, params, request_id)
        completion = final.outputs[0]
        read = completion.logprobs[0] if completion.logprobs else {}
        missing = [option for option, token in zip(options, ids, strict=True) if token not in read]
        if missing:
            self._counters.failed += 1
            raise EngineError(f"request {engine_request_id}: no log-prob for option(s) {missing}")
        self._counters.record(
            ChatResult("", "length", len(prompt_ids), len(completion.token_ids), final.num_cached_tokens)
        )
        return {option: float(read[token].logprob) for option, token in zip(options, ids, strict=True)}

    def _check_room(self, prompt_ids: list[int]) -> int:
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            self._counters.failed += 1
            raise PromptTooLong(
                f"the conversation is {len(prompt_ids)} tokens; with at least one new token it "
                f"does not fit the model's context of {self.max_model_len} tokens"
            )
        return room

    async def _generate(self, prompt_ids: list[int], params: Any, request_id: str) -> tuple[str, Any]:
        """Run one request to its final output; failures mapped as `chat` maps them."""
        from vllm.inputs import TokensPrompt

        if self._engine is None:
            raise EngineError("the engine is not started")
        # The caller's id stays readable in vLLM's logs; the suffix keeps retries distinct.
        engine_request_id = f"{request_id}#{next(self._ids)}"
        self._counters.in_flight += 1
        try:
            final = None
            # The renderer's output is what generate() takes without the raw-prompt deprecation.
            (engine_input,) = self._engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=prompt_ids)])
            async for output in self._engine.generate(engine_input, params, engine_request_id):
                final = output
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._counters.failed += 1
            if _is_engine_dead(exc):
                raise EngineUnavailable(f"vLLM engine dead: {exc!r}") from exc
            if "maximum model length" in str(exc) or "context length" in str(exc):
                raise PromptTooLong(str(exc)) from exc
            raise EngineError(f"request {engine_request_id} failed: {exc!r}") from exc
        finally:
            self._counters.in_flight -= 1
        if final is None or not final.outputs:
            self._counters.failed += 1
            raise EngineError(f"request {engine_request_id} ended without output")
        return engine_request_id, final

    async def _chat_ids(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> ChatResult:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if self._engine is None:
            raise EngineError("the engine is not started")
        room = self._check_room(prompt_ids)
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=min(sampling.max_tokens, room),
            seed=sampling.seed,
            stop_token_ids=[self._eos_token_id] if self._eos_token_id is not None else None,
            skip_special_tokens=True,
            # Only the final output: no per-token streaming work on this event loop.
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        engine_request_id, final = await self._generate(prompt_ids, params, request_id)
        completion = final.outputs[0]
        if completion.finish_reason not in ("stop", "length"):
            self._counters.failed += 1
            raise EngineError(f"request {engine_request_id} finished with {completion.finish_reason!r}")
        result = ChatResult(
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(completion.token_ids),
            cached_tokens=final.num_cached_tokens,
        )
        self._counters.record(result)
        return result

    def stats(self) -> EngineStats:
        return self._counters.snapshot()

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # AsyncLLM holds reference cycles; collecting it now keeps its __del__ (a second
            # shutdown) from running during interpreter teardown, where it fails noisily.
            del engine
            gc.collect()


def option_token_ids(tokenizer: Any, assistant_prefix: str, options: list[str]) -> list[int]:
    """The token id of each option as the one token that follows `assistant_prefix`, or
    `OptionNotOneToken` (see `VLLMEngine.option_token_ids`)."""
    prefix = list(tokenizer.encode(assistant_prefix, add_special_tokens=False))
    ids = []
    for option in options:
        full = list(tokenizer.encode(assistant_prefix + option, add_special_tokens=False))
        if len(full) != len(prefix) + 1 or full[: len(prefix)] != prefix:
            raise OptionNotOneToken(
                f"option {option!r} is not one token after {assistant_prefix[-40:]!r} for this "
                f"model's tokenizer (the prefix is {len(prefix)} tokens, prefix + option "
                f"{len(full)}): its probability cannot be read from one token's log-prob"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise OptionNotOneToken(f"options {options} are not distinct tokens after the prefix")
    return ids


def _is_engine_dead(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError) or isinstance(exc.__cause__, EngineDeadError)


def _cpu_has_fast_bf16() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


# --- remote OpenAI-compatible server -----------------------------------------------------------

_CONTEXT_TOO_LONG = re.compile(
    r"context length|context window|maximum model length|too long|context_length_exceeded", re.IGNORECASE
)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:2000]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("code") or error)
        return str(error)
    return str(body)


class OpenAIEngine:
    """`/v1/chat/completions` of any OpenAI-compatible server (e.g. `vllm serve`) over httpx.

    At most `concurrency` requests are on the wire at once. Connection errors, timeouts, 429 and
    5xx are retried up to `max_retries` times with exponential backoff and jitter (a `Retry-After`
    header wins when larger); other 4xx fail at once, a 400 about the context length as
    `PromptTooLong`. A request does not hold its concurrency slot while it backs off.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "",
        concurrency: int = 32,
        timeout_seconds: float = 120.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._concurrency = concurrency
        self._timeout = timeout_seconds
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._transport = transport
        self._sleep = sleep
        self._semaphore = asyncio.Semaphore(concurrency)
        self._client: httpx.AsyncClient | None = None
        self._ids = itertools.count()
        self._counters = _Counters()
        # The served context length, where the server says it (vLLM lists it in /v1/models).
        self.max_model_len: int | None = None

    async def start(self) -> None:
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self._timeout, connect=min(10.0, self._timeout)),
            limits=httpx.Limits(
                max_connections=self._concurrency, max_keepalive_connections=self._concurrency
            ),
            transport=self._transport,
        )
        self.max_model_len = await self._served_max_model_len()

    async def _served_max_model_len(self) -> int | None:
        assert self._client is not None
        try:
            response = await self._client.get("/models")
            models = response.json()["data"] if response.status_code == 200 else []
        except (httpx.TransportError, ValueError, KeyError, TypeError):
            return None
        for entry in models:
            if isinstance(entry, dict) and entry.get("id") == self.model:
                length = entry.get("max_model_len")
                return int(length) if isinstance(length, int) else None
        return None

    async def _room_for_answer(self, messages: Messages, *, continue_final: bool = False) -> int | None:
        """Tokens left after the rendered conversation (vLLM's `/tokenize`); None if unknown.

        `vllm serve` refuses a request whose prompt plus `max_tokens` exceeds the context (a 400)
        where the in-process engine clamps `max_tokens`; asking first makes both behave alike.
        """
        if self.max_model_len is None or self._client is None:
            return None
        root = self.base_url.removesuffix("/v1")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        if continue_final:
            body |= {"add_generation_prompt": False, "continue_final_message": True}
        try:
            response = await self._client.post(f"{root}/tokenize", json=body)
            count = int(response.json()["count"]) if response.status_code == 200 else None
        except (httpx.TransportError, ValueError, KeyError, TypeError):
            count = None
        if count is None:  # a server without /tokenize: send the request as it is
            self.max_model_len = None
            return None
        return self.max_model_len - count

    def backoff_seconds(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number `attempt + 1`: exponential, with half of it jittered."""
        cap = min(self._backoff_max, self._backoff_base * 2**attempt)
        delay = cap / 2 + random.uniform(0, cap / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._backoff_max))
        return delay

    async def chat(self, messages: Messages, sampling: Sampling, request_id: str) -> ChatResult:
        return await self._chat(messages, sampling, request_id)

    async def continue_chat(
        self, messages: Messages, assistant_prefix: str, sampling: Sampling, request_id: str
    ) -> ChatResult:
        """`chat`, with the assistant's answer already started by `assistant_prefix` (the text
        returned is what follows it). Needs a server that continues a final assistant message
        (vLLM's `continue_final_message`)."""
        return await self._chat(
            [*messages, {"role": "assistant", "content": assistant_prefix}],
            sampling,
            request_id,
            extra=_CONTINUE_FINAL,
        )

    async def option_logprobs(
        self, messages: Messages, assistant_prefix: str, options: list[str], request_id: str
    ) -> dict[str, float]:
        """Log-probs of each one-token option as the next token after `assistant_prefix`.

        One `/chat/completions` request for one token with `logprobs` and the top 20 alternatives
        (OpenAI's most), the answer started by `assistant_prefix` (vLLM's `continue_final_message`;
        a server without it answers from a fresh assistant turn). Options are matched by token
        text. An option that is not among the 20 gets the lowest log-prob returned, an upper bound
        of its true value: normalised over the options, the result is then never more confident
        than the truth (both missing: an even 0.5). The values are the server's log-probs over the
        full vocabulary (vLLM: raw, before any sampling settings).
        """
        if self._client is None:
            raise EngineError("the engine is not started")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*messages, {"role": "assistant", "content": assistant_prefix}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": _TOP_LOGPROBS,
            **_CONTINUE_FINAL,
        }
        call = next(self._ids)
        self._counters.in_flight += 1
        try:
            result, read = await self._post_with_retries(
                body,
                f"{request_id}#{call}",
                parse=lambda response, rid: _parse_option_logprobs(response, rid, options),
            )
        except BaseException:
            self._counters.failed += 1
            raise
        finally:
            self._counters.in_flight -= 1
        self._counters.record(result)
        return read

    async def _chat(
        self, messages: Messages, sampling: Sampling, request_id: str, extra: dict[str, Any] | None = None
    ) -> ChatResult:
        if self._client is None:
            raise EngineError("the engine is not started")
        max_tokens = sampling.max_tokens
        room = await self._room_for_answer(messages, continue_final=bool(extra))
        if room is not None:
            if room < 1:
                self._counters.failed += 1
                raise PromptTooLong(
                    f"the conversation leaves no room for an answer in the model's context of "
                    f"{self.max_model_len} tokens"
                )
            max_tokens = min(max_tokens, room)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": max_tokens,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        body |= extra or {}
        call = next(self._ids)
        self._counters.in_flight += 1
        try:
            result = await self._post_with_retries(body, f"{request_id}#{call}")
        except BaseException:
            self._counters.failed += 1
            raise
        finally:
            self._counters.in_flight -= 1
        self._counters.record(result)
        return result

    async def _post_with_retries(
        self,
        body: dict[str, Any],
        request_id: str,
        parse: Callable[[httpx.Response, str], Any] | None = None,
    ) -> Any:
        """POST `body` to /chat/completions; `parse` (default: a ChatResult) reads a 200."""
        assert self._client is not None
        parse = parse or self._parse
        for attempt in range(self._max_retries + 1):
            retry_after: float | None = None
            async with self._semaphore:
                try:
                    response = await self._client.post(
                        "/chat/completions", json=body, headers={"X-Request-Id": f"{request_id}.{attempt}"}
                    )
                except httpx.TransportError as exc:  # connection refused/reset, timeouts
                    problem = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code == 200:
                        return parse(response, request_id)
                    message = _error_message(response)
                    if response.status_code == 400 and _CONTEXT_TOO_LONG.search(message):
                        raise PromptTooLong(message)
                    if response.status_code != 429 and response.status_code < 500:
                        raise EngineError(f"HTTP {response.status_code} from {self.base_url}: {message}")
                    problem = f"HTTP {response.status_code}: {message}"
                    retry_after = _retry_after(response)
            if attempt == self._max_retries:
                break
            delay = self.backoff_seconds(attempt, retry_after)
            log.warning("request %s: %s; retry %d in %.2f s", request_id, problem, attempt + 1, delay)
            await self._sleep(delay)
        # Unreachable or failing for every retry: the server is down, not this prompt's fault.
        raise EngineUnavailable(
            f"request {request_id} failed after {self._max_retries + 1} attempts: {problem}"
        )

    @staticmethod
    def _parse(response: httpx.Response, request_id: str) -> ChatResult:
        try:
            data = response.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            text = choice["message"].get("content") or ""
            finish_reason = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise EngineError(f"request {request_id}: malformed response {response.text[:500]!r}") from exc
        if finish_reason not in ("stop", "length"):
            raise EngineError(f"request {request_id} finished with {finish_reason!r}")
        cached = details.get("cached_tokens")
        return ChatResult(
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(cached) if cached is not None else None,
        )

    def stats(self) -> EngineStats:
        return self._counters.snapshot()

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


# vLLM's extra chat parameters that continue a final assistant message instead of starting a new one.
_CONTINUE_FINAL = {"add_generation_prompt": False, "continue_final_message": True}
_TOP_LOGPROBS = 20  # the most the OpenAI API (and vLLM's default max_logprobs) allows


def _parse_option_logprobs(
    response: httpx.Response, request_id: str, options: list[str]
) -> tuple[ChatResult, dict[str, float]]:
    """The option log-probs of a one-token answer with `top_logprobs` (see `option_logprobs`)."""
    try:
        data = response.json()
        choice = data["choices"][0]
        first = choice["logprobs"]["content"][0]
        listed = {first["token"]: float(first["logprob"])}
        for entry in first.get("top_logprobs") or []:
            listed[entry["token"]] = float(entry["logprob"])
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise EngineError(
            f"request {request_id}: no log-probs in the response {response.text[:500]!r}"
        ) from exc
    floor = min(listed.values())
    read = {option: listed.get(option, floor) for option in options}
    if missing := [option for option in options if option not in listed]:
        log.debug(
            "request %s: option(s) %s not in the top %d; bounded by %.3f",
            request_id,
            missing,
            len(listed),
            floor,
        )
    cached = details.get("cached_tokens")
    result = ChatResult(
        text="",
        finish_reason="length",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(cached) if cached is not None else None,
    )
    return result, read


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


# --- construction ------------------------------------------------------------------------------


def make_engine(settings: Settings, model: str, trained_path: str | None = None) -> Engine:
    """The engine `settings.engine` names, for `model` (a name `resolve_model` understands)."""
    if settings.engine == "openai":
        return OpenAIEngine(
            settings.openai_base_url,
            settings.openai_model or model,
            api_key=settings.openai_api_key,
            concurrency=settings.openai_concurrency,
            timeout_seconds=settings.openai_timeout_seconds,
            max_retries=settings.openai_max_retries,
        )
    from cai_dpo.core.model_sources import resolve_model

    return VLLMEngine(
        resolve_model(model, settings, trained_path=trained_path),
        name=model,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        memory_fraction=settings.vllm_memory_fraction,
        max_model_len=settings.vllm_max_model_len,
        enforce_eager=settings.vllm_enforce_eager,
        kv_cache_memory_bytes=int(settings.vllm_kv_cache_gib * 2**30) if settings.vllm_kv_cache_gib else None,
        dtype=settings.vllm_dtype,
    )
