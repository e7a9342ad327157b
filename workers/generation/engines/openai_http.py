"""The remote engine: `OpenAIEngine` drives any OpenAI-compatible server (e.g. `vllm serve`) over
httpx, with bounded concurrency and retries."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from workers.generation.engines.aiohttp_transport import AiohttpTransport
from workers.generation.engines.base import (
    ChatResult,
    EngineError,
    EngineStats,
    EngineUnavailable,
    Messages,
    PromptTooLong,
    RequestCounters,
    Sampling,
)

log = logging.getLogger(__name__)

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

    `stats()` reports the server's occupancy (running, waiting, KV cache usage) as of the last
    `refresh_stats()`, which reads its Prometheus `/metrics` (vLLM's gauges) at most once per
    `metrics_interval_seconds`; `max_num_seqs` is what the caller says the server batches.
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
        max_num_seqs: int | None = None,
        metrics_interval_seconds: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.model = model
        # Where the server computes is its own business; it is no CPU engine of this machine.
        self.on_cpu = False
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
        self._counters = RequestCounters()
        # The served context length, where the server says it (vLLM lists it in /v1/models).
        self.max_model_len: int | None = None
        self.max_num_seqs = max_num_seqs
        self._metrics_interval = metrics_interval_seconds
        self._metrics_read_at: float | None = None  # monotonic time of the last /metrics attempt
        self._metrics_served = True  # False once the server answered that it has no /metrics
        self._occupancy: tuple[int | None, int | None, float | None] = (None, None, None)
        # Token counts of answered conversations by `conversation_key`, oldest first (dicts keep
        # insertion order): enough for every trajectory in flight to find its last answer.
        self._known_tokens: dict[bytes, int] = {}
        self._known_tokens_max = 8 * concurrency

    async def start(self) -> None:
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self._timeout, connect=min(10.0, self._timeout)),
            # Room beside the chats for the small requests (/tokenize, /metrics), which must not
            # wait for a chat to finish to get a connection.
            limits=httpx.Limits(
                max_connections=self._concurrency + _SIDE_CONNECTIONS,
                max_keepalive_connections=self._concurrency + _SIDE_CONNECTIONS,
            ),
            # aiohttp's pool on the wire: httpx's own costs CPU per request that grows with the
            # connections held (aiohttp_transport.py).
            transport=self._transport
            or AiohttpTransport(max_connections=self._concurrency + _SIDE_CONNECTIONS),
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

    async def _room_for_answer(
        self, messages: Messages, max_tokens: int, *, continue_final: bool = False
    ) -> int | None:
        """Tokens left after the rendered conversation, at least; None if unknown.

        `vllm serve` refuses a request whose prompt plus `max_tokens` exceeds the context (a 400)
        where the in-process engine clamps `max_tokens`; knowing the room makes both behave alike.
        A conversation whose token bound (`prompt_token_bound`) leaves room for `max_tokens` needs
        nothing more; only one that may not asks the server's `/tokenize` for its exact count.
        """
        if self.max_model_len is None or self._client is None:
            return None
        bound = prompt_token_bound(messages)
        if bound + max_tokens <= self.max_model_len:
            return self.max_model_len - bound
        # A conversation that continues one this engine saw answered (the critique request after
        # the answer, the revision request after the critique): the server's count of that one,
        # plus the bound of what is new, so a trajectory asks /tokenize once at most.
        known = self._known_tokens.get(conversation_key(messages[:-1])) if len(messages) > 1 else None
        if known is not None:
            bound = min(bound, known + prompt_token_bound(messages[-1:]))
            if bound + max_tokens <= self.max_model_len:
                return self.max_model_len - bound
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
        with self._counters.request():
            result, read = await self._post_with_retries(
                body,
                f"{request_id}#{call}",
                parse=lambda response, rid: _parse_option_logprobs(response, rid, options),
            )
            self._counters.record(result)
        return read

    async def _chat(
        self, messages: Messages, sampling: Sampling, request_id: str, extra: dict[str, Any] | None = None
    ) -> ChatResult:
        if self._client is None:
            raise EngineError("the engine is not started")
        max_tokens = sampling.max_tokens
        room = await self._room_for_answer(messages, max_tokens, continue_final=bool(extra))
        with self._counters.request():
            if room is not None:
                if room < 1:
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
            result = await self._post_with_retries(body, f"{request_id}#{call}")
            self._counters.record(result)
            if not extra:
                self._remember_tokens(messages, result)
        return result

    def _remember_tokens(self, messages: Messages, result: ChatResult) -> None:
        """Keep the server's count of the conversation with its answer (the prompt and completion
        tokens, and slack for the answer's re-tokenization and end of turn), for the requests that
        continue it; the oldest entries go first."""
        if not result.prompt_tokens:
            return
        answered = [*messages, {"role": "assistant", "content": result.text}]
        self._known_tokens[conversation_key(answered)] = (
            result.prompt_tokens + result.completion_tokens + _RETOKENIZE_SLACK
        )
        while len(self._known_tokens) > self._known_tokens_max:
            self._known_tokens.pop(next(iter(self._known_tokens)))

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
        running, waiting, kv_cache_usage = self._occupancy
        return self._counters.snapshot(
            running=running, waiting=waiting, kv_cache_usage=kv_cache_usage, max_num_seqs=self.max_num_seqs
        )

    async def refresh_stats(self) -> None:
        """Read the server's occupancy from its Prometheus `/metrics` (vLLM's
        `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`), at
        most once per `metrics_interval_seconds`. Never raises: an unreachable server or an
        unreadable answer leaves the fields None until a later read works; a server without
        `/metrics` (a 404) is not asked again."""
        now = time.monotonic()
        if (
            self._client is None
            or not self._metrics_served
            or (self._metrics_read_at is not None and now - self._metrics_read_at < self._metrics_interval)
        ):
            return
        self._metrics_read_at = now  # before the await: concurrent callers do not ask twice
        root = self.base_url.removesuffix("/v1")
        try:
            response = await self._client.get(f"{root}/metrics", timeout=_METRICS_TIMEOUT)
        except httpx.HTTPError as exc:
            log.debug("no /metrics from %s: %r", root, exc)
            self._occupancy = (None, None, None)
            return
        if response.status_code in (404, 405):
            log.info("%s serves no /metrics: the engine's occupancy is unknown", root)
            self._metrics_served = False
            self._occupancy = (None, None, None)
            return
        self._occupancy = (
            parse_occupancy(response.text, self.model) if response.status_code == 200 else (None, None, None)
        )

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


# vLLM's extra chat parameters that continue a final assistant message instead of starting a new one.
_CONTINUE_FINAL = {"add_generation_prompt": False, "continue_final_message": True}
_TOP_LOGPROBS = 20  # the most the OpenAI API (and vLLM's default max_logprobs) allows
_SIDE_CONNECTIONS = 2  # connections beyond `concurrency`: /tokenize, /metrics
_METRICS_TIMEOUT = 5.0  # seconds for one /metrics read (pool wait included): a heartbeat waits on it

# An upper bound of a rendered conversation's tokens, from its text alone (`prompt_token_bound`).
# Byte-level BPE tokenizers (GPT-2's family: SmolLM2, Llama 3, Qwen, Mistral's Tekken) cover at least
# one byte of text with every token, and byte-fallback SentencePiece ones (Llama 2, Mistral v1-v3,
# Gemma) at least one byte too, an unknown character falling back to one token per byte: the
# content's UTF-8 bytes bound its tokens. SentencePiece's leading "▁" may add one token per piece
# of text between special tokens, which the per-message allowance covers.
# What the template adds around each message: role markers and separators (SmolLM2 and Qwen's
# `<|im_start|>user\n ... <|im_end|>\n`: 5 tokens; Llama 3's `<|start_header_id|>user<|end_header_id|>
# \n\n ... <|eot_id|>`: 5; Mistral's `[INST] ... [/INST]`: 4), with room to spare.
_TEMPLATE_TOKENS_PER_MESSAGE = 16
# What the template adds once: the generation prompt (SmolLM2's `<|im_start|>assistant\n`: 4
# tokens), a begin-of-text token, and a default system prompt where the conversation has none:
# SmolLM2's ("You are a helpful AI assistant named SmolLM, trained by Hugging Face": 21 tokens with
# its markers), Qwen2.5's (about 25), Llama 3.1's date header ("Cutting Knowledge Date: December
# 2023 / Today Date: 26 Jul 2024": about 30 with its markers); four times the largest of these.
# A template that adds much more (tool schemas, long fixed instructions) would need more here.
# tests/test_engines.py checks the bound against SmolLM2's tokenizer on random text.
_TEMPLATE_TOKENS_FIXED = 128


# Tokens a re-rendered answer may take beyond the server's completion count: an end-of-turn marker
# the completion did not count, and a few tokens where the answer text tokenizes differently as
# part of the prompt than it did as it was generated.
_RETOKENIZE_SLACK = 16


def conversation_key(messages: Messages) -> bytes:
    """A digest of the conversation's roles and contents, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for message in messages:
        digest.update(str(message.get("role")).encode())
        digest.update(b"\x00")
        digest.update(str(message.get("content") or "").encode())
        digest.update(b"\x01")
    return digest.digest()


def prompt_token_bound(messages: Messages) -> int:
    """At least as many tokens as `messages` rendered by a chat template take (the constants above
    say why); only a conversation this bound does not fit needs the server's exact count."""
    content = sum(len(str(message.get("content") or "").encode()) for message in messages)
    return content + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages) + _TEMPLATE_TOKENS_FIXED


# A sample line of Prometheus' text format: `name{label="value",...} value [timestamp]`.
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_MODEL_LABEL = re.compile(r'model_name="(?P<model>(?:[^"\\]|\\.)*)"')
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
# vLLM's KV cache usage gauge, a fraction (0..1) despite its name; older vLLM versions called it
# `vllm:gpu_cache_usage_perc` (vLLM 0.32 serves only the new name).
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_occupancy(text: str, model: str) -> tuple[int | None, int | None, float | None]:
    """Running and waiting requests (summed over the server's engines, one per data-parallel rank)
    and the mean KV cache usage, from a vLLM server's Prometheus text; only samples of `model`
    where they name one. None for a gauge the text lacks."""
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:") or not (match := _SAMPLE.match(line)):
            continue
        name = match["name"]
        if name not in (_RUNNING, _WAITING, *_KV_USAGE):
            continue
        labelled = _MODEL_LABEL.search(match["labels"] or "")
        if labelled and labelled["model"] != model:
            continue
        try:
            values.setdefault(name, []).append(float(match["value"]))
        except ValueError:
            continue
    running = int(sum(values[_RUNNING])) if _RUNNING in values else None
    waiting = int(sum(values[_WAITING])) if _WAITING in values else None
    usage = next((values[name] for name in _KV_USAGE if name in values), None)
    return running, waiting, (sum(usage) / len(usage) if usage else None)


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
