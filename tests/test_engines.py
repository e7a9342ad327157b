"""The chat engines: OpenAIEngine's retries and concurrency over a mock transport (fast), the real
in-process VLLMEngine on the bundled model, and OpenAIEngine against a real `vllm serve`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cai_dpo.core.settings import Settings
from tests.fixtures.openai_stub import StubLLM
from tests.helpers import free_port
from workers.generation.engines import (
    ChatResult,
    Engine,
    EngineError,
    EngineStats,
    OpenAIEngine,
    PromptTooLong,
    Sampling,
    VLLMEngine,
    make_engine,
)
from workers.generation.engines.openai_http import parse_occupancy, prompt_token_bound
from workers.generation.engines.vllm_local import Occupancy

MODEL_NAME = "smollm2-135m-instruct"
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=64)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# vLLM's own wording for a prompt that does not fit (HTTP 400 from `vllm serve`).
VLLM_TOO_LONG = (
    "This model's maximum context length is 2048 tokens. However, your prompt contains 3031 input "
    "tokens, which exceeds this limit even without any output tokens."
)
# Far over 2048 tokens with any tokenizer.
TOO_LONG = [{"role": "user", "content": "hello " * 3000}]
# A shared prefix of several KV blocks (vLLM's CPU block size is 128 tokens).
SHARED_SYSTEM = {
    "role": "system",
    "content": " ".join(
        f"Rule {i}: answer plainly, name your assumptions, and never invent facts about topic {i}."
        for i in range(30)
    ),
}
TOPICS = ["rivers", "bread", "chess", "volcanoes", "owls", "bridges", "tea", "comets",
          "violins", "glaciers", "bees", "lighthouses", "maps", "clocks", "salt", "kites"]  # fmt: skip


# --- OpenAIEngine over httpx.MockTransport: no network --------------------------------------------


def completion(text: str = "Paris.", finish: str = "stop", cached: int | None = None) -> dict:
    usage: dict = {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": usage,
    }


def mock_engine(handler, **kwargs) -> tuple[OpenAIEngine, list[float]]:
    """An OpenAIEngine whose chat requests `handler` answers, on a server that does not say its
    context length (`GET /models` is a 404), so no `/tokenize` request comes before a chat."""
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(404)
        return handler(request)

    options = {"max_retries": 4, "backoff_base": 0.5, "backoff_max": 30.0, **kwargs}
    engine = OpenAIEngine(
        "http://llm.test/v1",
        MODEL_NAME,
        transport=httpx.MockTransport(server),
        sleep=record_sleep,
        **options,
    )
    return engine, delays


async def started(engine: OpenAIEngine, coro_factory):
    await engine.start()
    try:
        return await coro_factory()
    finally:
        await engine.shutdown()


@pytest.mark.unit
def test_openai_engine_sends_the_request_and_reads_usage():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion(cached=16))

    engine, _ = mock_engine(handler, api_key="sekret")
    sampling = Sampling(temperature=0.3, top_p=0.9, max_tokens=17, seed=5)
    result = asyncio.run(started(engine, lambda: engine.chat(QUESTION, sampling, "p1")))

    assert result == ChatResult("Paris.", "stop", prompt_tokens=21, completion_tokens=3, cached_tokens=16)
    (request,) = seen
    assert request.url == "http://llm.test/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sekret"
    body = json.loads(request.content)
    assert body == {
        "model": MODEL_NAME,
        "messages": QUESTION,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 17,
        "seed": 5,
    }
    stats = engine.stats()
    assert (stats.requests, stats.prompt_tokens, stats.completion_tokens, stats.cached_prompt_tokens) == (
        1,
        21,
        3,
        16,
    )
    assert stats.in_flight == 0 and stats.failed == 0


@pytest.mark.unit
def test_openai_engine_without_cached_details_reports_none_and_length():
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=completion(finish="length"))

    engine, _ = mock_engine(handler)
    result = asyncio.run(started(engine, lambda: engine.chat(QUESTION, GREEDY, "p1")))
    assert result.cached_tokens is None and result.finish_reason == "length"
    assert "seed" not in bodies[0] and "Authorization" not in bodies[0]


@pytest.mark.unit
def test_openai_engine_rejects_an_unexpected_finish_reason():
    engine, delays = mock_engine(lambda request: httpx.Response(200, json=completion(finish="abort")))
    with pytest.raises(EngineError, match="abort"):
        asyncio.run(started(engine, lambda: engine.chat(QUESTION, GREEDY, "p1")))
    assert engine.stats().failed == 1


@pytest.mark.unit
def test_openai_engine_retries_5xx_with_growing_backoff_then_succeeds():
    statuses = iter([503, 502, 200])
    request_ids: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request_ids.append(request.headers["X-Request-Id"])
        status = next(statuses)
        return httpx.Response(status, json=completion() if status == 200 else {"error": {"message": "busy"}})

    engine, delays = mock_engine(handler)
    result = asyncio.run(started(engine, lambda: engine.chat(QUESTION, GREEDY, "p7")))

    assert result.text == "Paris."
    assert len(request_ids) == 3 and len(set(request_ids)) == 3, "each attempt needs its own request id"
    assert all(rid.startswith("p7") for rid in request_ids)
    assert len(delays) == 2
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0  # half-jittered 0.5 s, then 1 s
    assert engine.stats().requests == 1 and engine.stats().failed == 0


@pytest.mark.unit
def test_openai_engine_retries_429_honouring_retry_after():
    statuses = iter([429, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        if status == 429:
            return httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json=completion())

    engine, delays = mock_engine(handler)
    asyncio.run(started(engine, lambda: engine.chat(QUESTION, GREEDY, "p1")))
    assert delays == [7.0]


@pytest.mark.unit
def test_openai_engine_gives_up_on_connection_errors_after_max_retries():
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    engine, delays = mock_engine(handler, max_retries=3)
    with pytest.raises(EngineError, match="after 4 attempts.*ConnectError"):
        asyncio.run(started(engine, lambda: engine.chat(QUESTION, GREEDY, "p1")))
    assert calls == 4 and len(delays) == 3
    assert delays == sorted(delays)  # each cap doubles and jitter takes at most half of it
    assert engine.stats().failed == 1 and engine.stats().requests == 0


@pytest.mark.unit
@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_openai_engine_fails_client_errors_at_once(status):
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={"error": {"message": "bad model name"}})

    engine, delays = mock_engine(handler)
    with pytest.raises(EngineError, match=f"HTTP {status}.*bad model name") as caught:
        asyncio.run(started(engine, lambda: engine.chat(QUESTION, GREEDY, "p1")))
    assert not isinstance(caught.value, PromptTooLong)
    assert calls == 1 and delays == []


@pytest.mark.unit
def test_openai_engine_maps_context_length_400_to_prompt_too_long():
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json={"error": {"message": VLLM_TOO_LONG, "type": "BadRequestError"}})

    engine, delays = mock_engine(handler)
    with pytest.raises(PromptTooLong, match="maximum context length"):
        asyncio.run(started(engine, lambda: engine.chat(QUESTION, GREEDY, "p1")))
    assert calls == 1 and delays == []


@pytest.mark.unit
def test_openai_engine_never_exceeds_its_concurrency_limit():
    limit, requests = 3, 12
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(20):  # yield so that every other request gets its chance to enter
            await asyncio.sleep(0)
        in_flight -= 1
        return httpx.Response(200, json=completion())

    engine, _ = mock_engine(handler, concurrency=limit)

    async def many():
        return await asyncio.gather(*(engine.chat(QUESTION, GREEDY, f"p{i}") for i in range(requests)))

    results = asyncio.run(started(engine, many))
    assert len(results) == requests
    assert peak == limit
    assert engine.stats().requests == requests and engine.stats().in_flight == 0


@pytest.mark.unit
def test_openai_engine_cancelled_chat_frees_its_slot_and_is_no_failure():
    # As the in-process engine (test_vllm_cancelled_chat_frees_its_slot): the caller gave it up.
    async def never_answers(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    engine, _ = mock_engine(never_answers)

    async def cancel_midway():
        task = asyncio.create_task(engine.chat(QUESTION, GREEDY, "cancel-me"))
        while engine.stats().in_flight == 0:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.stats()

    after = asyncio.run(started(engine, cancel_midway))
    assert (after.in_flight, after.failed, after.requests) == (0, 0, 0)


@pytest.mark.unit
def test_openai_engine_backoff_is_exponential_capped_and_jittered():
    engine = OpenAIEngine("http://llm.test/v1", MODEL_NAME, backoff_base=1.0, backoff_max=10.0)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        delays = {engine.backoff_seconds(attempt) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1, "no jitter"


# --- OpenAIEngine: /tokenize only near the context's end ------------------------------------------


def sized_engine(tokenize_count, max_model_len: int = 2048) -> tuple[OpenAIEngine, list[str], list[dict]]:
    """An OpenAIEngine on a server that says its context length; `/tokenize` answers
    `tokenize_count(body)`. Returns the engine, every path asked and every chat body sent."""
    paths: list[str] = []
    chats: list[dict] = []

    def server(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/models":
            entry = {"id": MODEL_NAME, "object": "model", "max_model_len": max_model_len}
            return httpx.Response(200, json={"object": "list", "data": [entry]})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"count": tokenize_count(json.loads(request.content))})
        chats.append(json.loads(request.content))
        return httpx.Response(200, json=completion())

    engine = OpenAIEngine("http://llm.test/v1", MODEL_NAME, transport=httpx.MockTransport(server))
    return engine, paths, chats


@pytest.mark.unit
def test_openai_engine_sends_no_tokenize_for_a_conversation_that_certainly_fits():
    engine, paths, chats = sized_engine(lambda body: pytest.fail("no /tokenize expected"))
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Why?"},
    ]

    async def work():
        await engine.chat(QUESTION, GREEDY, "short")
        await engine.chat(conversation, Sampling(temperature=0.0, top_p=1.0, max_tokens=1024), "longer")

    asyncio.run(started(engine, work))
    assert paths == ["/v1/models", "/v1/chat/completions", "/v1/chat/completions"]
    assert [body["max_tokens"] for body in chats] == [64, 1024]


@pytest.mark.unit
def test_openai_engine_asks_tokenize_near_the_context_end_and_clamps_max_tokens():
    # 1,900 bytes of content: the bound (one token a byte, plus the template's allowance) does not
    # leave 256 tokens of a 2048-token context, so the engine asks; the server counts 2,000.
    engine, paths, chats = sized_engine(lambda body: 2000)
    long = [{"role": "user", "content": "word " * 380}]
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=256)
    result = asyncio.run(started(engine, lambda: engine.chat(long, sampling, "long")))
    assert result.text == "Paris."
    assert paths == ["/v1/models", "/tokenize", "/v1/chat/completions"]
    assert chats[0]["max_tokens"] == 48

    # The same conversation with an answer short enough to fit whatever its tokens: no question.
    engine, paths, chats = sized_engine(lambda body: pytest.fail("no /tokenize expected"))
    few = Sampling(temperature=0.0, top_p=1.0, max_tokens=2048 - prompt_token_bound(long))
    asyncio.run(started(engine, lambda: engine.chat(long, few, "fits")))
    assert paths == ["/v1/models", "/v1/chat/completions"] and chats[0]["max_tokens"] == few.max_tokens


@pytest.mark.unit
def test_openai_engine_asks_tokenize_once_per_conversation():
    """The requests that continue an answered conversation (a critique after the answer, a
    revision after the critique) are bounded by the server's own count of it, not asked again."""
    paths: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/models":
            entry = {"id": MODEL_NAME, "object": "model", "max_model_len": 2048}
            return httpx.Response(200, json={"object": "list", "data": [entry]})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"count": 400})
        answer = completion("Paris.")
        answer["usage"] = {"prompt_tokens": 400, "completion_tokens": 3, "total_tokens": 403}
        return httpx.Response(200, json=answer)

    engine = OpenAIEngine("http://llm.test/v1", MODEL_NAME, transport=httpx.MockTransport(server))
    long = [{"role": "user", "content": "word " * 380}]  # over the byte bound's room for 256 tokens
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=256)
    critique = [*long, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}]
    other = [*long, {"role": "assistant", "content": "Lyon."}, {"role": "user", "content": "Why?"}]

    async def work():
        await engine.chat(long, sampling, "answer")
        await engine.chat(critique, sampling, "critique")  # continues the answer: no /tokenize
        await engine.chat(other, sampling, "another")  # an answer never given: asked

    asyncio.run(started(engine, work))
    assert paths == [
        "/v1/models",
        "/tokenize",
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/v1/chat/completions",
    ]


@pytest.mark.unit
def test_openai_engine_prompt_too_long_from_tokenize_sends_no_chat():
    engine, paths, chats = sized_engine(lambda body: 2048)
    with pytest.raises(PromptTooLong, match="no room for an answer"):
        asyncio.run(started(engine, lambda: engine.chat(TOO_LONG, GREEDY, "long")))
    assert paths == ["/v1/models", "/tokenize"] and chats == []
    assert engine.stats().failed == 1


@pytest.mark.unit
def test_openai_engine_continuation_near_the_context_end_is_counted_as_a_continuation():
    bodies: list[dict] = []
    engine, paths, chats = sized_engine(lambda body: bodies.append(body) or 1000)
    long = [{"role": "user", "content": "word " * 380}]
    asyncio.run(started(engine, lambda: engine.continue_chat(long, "Because", GREEDY, "go on")))
    (body,) = bodies
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "Because"}


@pytest.mark.model
def test_prompt_token_bound_holds_for_the_bundled_tokenizer(bundled_model_path):
    """The bound is at least the rendered conversation's tokens, for text of every kind: ASCII,
    accented and CJK letters, emoji, any code point, special-token look-alikes, empty messages."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    rng = random.Random(0)
    letters = [chr(c) for c in range(32, 0x2FF)] + list("日本語中文한국어😀🎉 \n\t")
    words = ["a", "I", "<|im_end|>", "<|im_start|>", " ", "\n", "x1", "…"]

    def text(n: int) -> str:
        kind = rng.random()
        if kind < 0.3:
            return "".join(rng.choice(letters) for _ in range(n))
        if kind < 0.6:
            return " ".join(rng.choice(words) for _ in range(n))
        points = (rng.randint(0x20, 0x10FFFF) for _ in range(n))
        return "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)

    closest = 0.0
    for _ in range(100):
        messages = [
            {"role": rng.choice(["system", "user", "assistant"]), "content": text(rng.randint(0, 300))}
            for _ in range(rng.randint(1, 6))
        ]
        for continuation in (False, True):
            tokens = tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=not continuation,
                continue_final_message=continuation and messages[-1]["role"] == "assistant",
                tokenize=True,
                return_dict=False,
            )
            assert len(tokens) <= prompt_token_bound(messages), messages
            closest = max(closest, len(tokens) / prompt_token_bound(messages))
    assert closest > 0.5, "the bound should not be loose by more than twice on random text"


# --- engine occupancy: EngineStats.running / waiting / kv_cache_usage / max_num_seqs --------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2-135m-instruct"} 5.0
vllm:num_requests_running{engine="1",model_name="smollm2-135m-instruct"} 3.0
vllm:num_requests_running{engine="0",model_name="another-model"} 40.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2-135m-instruct"} 2.0
vllm:num_requests_waiting{engine="1",model_name="smollm2-135m-instruct"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="smollm2-135m-instruct",reason="capacity"} 9.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2-135m-instruct"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="smollm2-135m-instruct"} 0.25
vllm:prompt_tokens_total{engine="0",model_name="smollm2-135m-instruct"} 1234.0
"""


@pytest.mark.unit
def test_parse_occupancy_reads_vllm_gauges_of_the_model_across_engines():
    assert parse_occupancy(VLLM_METRICS, MODEL_NAME) == (8, 2, 0.375)
    older = 'vllm:gpu_cache_usage_perc{model_name="smollm2-135m-instruct"} 0.125\n'
    assert parse_occupancy(older, MODEL_NAME) == (None, None, 0.125)
    assert parse_occupancy("# nothing of vLLM's\nprocess_cpu_seconds_total 3.0\n", MODEL_NAME) == (
        None,
        None,
        None,
    )
    assert parse_occupancy("vllm:num_requests_running 2\n", MODEL_NAME) == (2, None, None)  # no labels


def metrics_engine(metrics, **kwargs) -> tuple[OpenAIEngine, list[str]]:
    """An OpenAIEngine whose server answers `/metrics` with `metrics()` (a Response or an
    exception to raise) and every chat with `completion()`."""
    paths: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(404)
        if request.url.path == "/metrics":
            answer = metrics()
            if isinstance(answer, Exception):
                raise answer
            return answer
        return httpx.Response(200, json=completion())

    engine = OpenAIEngine("http://llm.test/v1", MODEL_NAME, transport=httpx.MockTransport(server), **kwargs)
    return engine, paths


@pytest.mark.unit
def test_openai_engine_refresh_stats_reads_metrics_at_most_once_per_interval():
    engine, paths = metrics_engine(lambda: httpx.Response(200, text=VLLM_METRICS), max_num_seqs=512)

    async def work():
        before = engine.stats()
        await asyncio.gather(engine.refresh_stats(), engine.refresh_stats())
        await engine.refresh_stats()
        return before, engine.stats()

    before, after = asyncio.run(started(engine, work))
    assert (before.running, before.waiting, before.kv_cache_usage) == (None, None, None)
    assert before.max_num_seqs == 512
    assert (after.running, after.waiting, after.kv_cache_usage, after.max_num_seqs) == (8, 2, 0.375, 512)
    assert paths.count("/metrics") == 1

    engine, paths = metrics_engine(
        lambda: httpx.Response(200, text=VLLM_METRICS), metrics_interval_seconds=0.0
    )

    async def twice():
        await engine.refresh_stats()
        await engine.refresh_stats()

    asyncio.run(started(engine, twice))
    assert paths.count("/metrics") == 2
    assert engine.stats().max_num_seqs is None  # not said: unknown


@pytest.mark.unit
def test_openai_engine_without_metrics_has_no_occupancy_and_no_complaints(caplog):
    engine, paths = metrics_engine(
        lambda: httpx.Response(404, text="Not Found"), metrics_interval_seconds=0.0
    )

    async def work():
        for _ in range(3):
            await engine.refresh_stats()
        return await engine.chat(QUESTION, GREEDY, "p1")

    with caplog.at_level("INFO", logger="workers.generation.engines.openai_http"):
        assert asyncio.run(started(engine, work)).text == "Paris."
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_cache_usage) == (None, None, None)
    assert paths.count("/metrics") == 1, "a server without /metrics is asked once"
    assert len(caplog.records) <= 1 and all(r.levelname == "INFO" for r in caplog.records)

    # Unreachable, then answering: None meanwhile, never an error, nothing above DEBUG.
    answers = iter([httpx.ConnectError("refused"), httpx.Response(200, text=VLLM_METRICS)])
    engine, paths = metrics_engine(lambda: next(answers), metrics_interval_seconds=0.0)
    caplog.clear()

    async def flaky():
        await engine.refresh_stats()
        down = engine.stats()
        await engine.refresh_stats()
        return down, engine.stats()

    with caplog.at_level("INFO", logger="workers.generation.engines.openai_http"):
        down, up = asyncio.run(started(engine, flaky))
    assert (down.running, down.kv_cache_usage) == (None, None)
    assert (up.running, up.waiting) == (8, 2)
    assert caplog.records == []


@pytest.mark.unit
def test_openai_engine_reads_the_stub_servers_occupancy():
    """Over the stub server's real app (tests/fixtures/openai_stub.py): a held chat runs."""
    stub = StubLLM(model=MODEL_NAME)
    stub.kv_cache_usage = 0.125
    engine = OpenAIEngine(
        "http://stub.test/v1",
        MODEL_NAME,
        metrics_interval_seconds=0.0,
        transport=httpx.ASGITransport(app=stub.app),
    )

    async def work():
        stub.hold()
        chat = asyncio.create_task(engine.chat(QUESTION, GREEDY, "held"))
        while not stub.held():
            await asyncio.sleep(0.01)
        await engine.refresh_stats()
        busy = engine.stats()
        stub.release()
        await chat
        await engine.refresh_stats()
        return busy, engine.stats()

    busy, idle = asyncio.run(started(engine, work))
    assert (busy.running, busy.waiting, busy.kv_cache_usage, busy.in_flight) == (1, 0, 0.125, 1)
    assert (idle.running, idle.in_flight) == (0, 0)


@pytest.mark.unit
def test_vllm_occupancy_sums_engine_cores_and_is_bounded_by_requests_in_flight():
    occupancy = Occupancy()
    assert occupancy.now(in_flight=3) == (None, None, None)  # no engine step yet
    occupancy.by_engine[0] = (4, 2, 0.5)
    occupancy.by_engine[1] = (3, 0, 0.25)
    assert occupancy.now(in_flight=20) == (7, 2, 0.375)
    # A cancelled request leaves the last step's numbers behind; the requests in flight bound them.
    assert occupancy.now(in_flight=8) == (7, 1, 0.375)
    assert occupancy.now(in_flight=0) == (0, 0, 0.375)


@pytest.mark.unit
def test_engine_stats_occupancy_is_optional():
    stats = EngineStats(requests=2, prompt_tokens=10, cached_prompt_tokens=5)
    assert (stats.running, stats.waiting, stats.kv_cache_usage, stats.max_num_seqs) == (None,) * 4
    assert stats.prefix_cache_hit_rate == 0.5


@pytest.mark.model
def test_make_engine_picks_the_engine_from_settings(bundled_model_path):
    remote = make_engine(
        Settings(engine="openai", openai_base_url="http://gpu-box:8001/v1", openai_concurrency=5), "my-model"
    )
    assert isinstance(remote, OpenAIEngine) and isinstance(remote, Engine)
    assert remote.model == "my-model" and remote.base_url == "http://gpu-box:8001/v1"
    assert remote.max_num_seqs is None
    named = make_engine(
        Settings(engine="openai", openai_model="served-name", openai_max_num_seqs=256), "my-model"
    )
    assert named.model == "served-name" and named.max_num_seqs == 256

    local = make_engine(Settings(engine="vllm", vllm_max_model_len=1024), str(bundled_model_path))
    assert isinstance(local, VLLMEngine) and isinstance(local, Engine)
    assert local.model_path == str(bundled_model_path) and local.max_model_len == 1024
    assert (local._max_num_seqs, local._max_num_batched_tokens, local._data_parallel_size) == (None, None, 1)
    tuned = make_engine(
        Settings(
            engine="vllm",
            vllm_max_num_seqs=512,
            vllm_max_num_batched_tokens=8192,
            vllm_data_parallel_size=2,
            vllm_tensor_parallel_size=2,
            vllm_load_format="dummy",
        ),
        str(bundled_model_path),
    )
    assert (tuned._max_num_seqs, tuned._max_num_batched_tokens) == (512, 8192)
    assert local._load_format == "auto" and tuned._load_format == "dummy"
    assert (tuned._data_parallel_size, tuned._tensor_parallel_size) == (2, 2)


# --- the real in-process VLLMEngine ---------------------------------------------------------------


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_chat_returns_text_finish_reason_and_token_counts(vllm_engine):
    engine: VLLMEngine = vllm_engine.engine
    result = vllm_engine.run(
        engine.chat(QUESTION, Sampling(temperature=0.0, top_p=1.0, max_tokens=128), "q1")
    )
    assert "paris" in result.text.lower()
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == len(engine.prompt_token_ids(QUESTION))
    assert 0 < result.completion_tokens < 128
    assert result.cached_tokens is not None

    short = vllm_engine.run(engine.chat(QUESTION, Sampling(temperature=0.0, top_p=1.0, max_tokens=3), "q2"))
    assert short.finish_reason == "length" and short.completion_tokens == 3 and short.text


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_stats_report_the_engines_occupancy(vllm_engine):
    """running / waiting / kv_cache_usage come from vLLM's own scheduler stats (the engine's stat
    logger), max_num_seqs from its scheduler config."""
    engine: VLLMEngine = vllm_engine.engine
    config = engine._engine.vllm_config
    assert engine.stats().max_num_seqs == config.scheduler_config.max_num_seqs > 0
    assert config.scheduler_config.enable_chunked_prefill is False  # on the CPU (vllm_local.py)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=32, seed=2)
    prompts = [[{"role": "user", "content": f"Tell me a story about {topic}."}] for topic in TOPICS[:3]]

    async def busy_then_idle():
        chats = [
            asyncio.create_task(engine.chat(p, sampling, f"occupancy-{i}")) for i, p in enumerate(prompts)
        ]
        seen: list = []
        while not all(chat.done() for chat in chats):
            stats = engine.stats()
            if stats.running:
                seen.append(stats)
            await asyncio.sleep(0.01)
        await asyncio.gather(*chats)
        return seen, engine.stats()

    seen, idle = vllm_engine.run(busy_then_idle())
    assert seen, "the engine never reported a running sequence while three chats ran"
    assert max(s.running + s.waiting for s in seen) <= 3
    assert all(0 < s.kv_cache_usage <= 1 for s in seen)
    assert (idle.running, idle.waiting, idle.in_flight) == (0, 0, 0)
    assert idle.kv_cache_usage is not None and 0 <= idle.kv_cache_usage < max(s.kv_cache_usage for s in seen)


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_many_concurrent_conversations_share_the_prefix_cache(vllm_engine):
    engine: VLLMEngine = vllm_engine.engine
    firsts = [[SHARED_SYSTEM, {"role": "user", "content": f"Tell me one fact about {t}."}] for t in TOPICS]
    shared = os.path.commonprefix([engine.prompt_token_ids(c) for c in firsts[:2]])
    assert len(shared) > 4 * 128, "the shared prefix should span several KV blocks"
    sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=48, seed=1)

    async def conversations():
        await engine.chat(firsts[0], sampling, "warm")  # computes the shared prefix once
        before = engine.stats()
        turn1 = await asyncio.gather(*(engine.chat(c, sampling, f"c{i}.1") for i, c in enumerate(firsts)))
        seconds = [
            [*c, {"role": "assistant", "content": r.text}, {"role": "user", "content": "Why does it matter?"}]
            for c, r in zip(firsts, turn1, strict=True)
        ]
        turn2 = await asyncio.gather(*(engine.chat(c, sampling, f"c{i}.2") for i, c in enumerate(seconds)))
        return before, turn1, turn2, engine.stats()

    before, turn1, turn2, after = vllm_engine.run(conversations(), timeout=600)

    assert all(r.text and r.completion_tokens > 0 for r in turn1 + turn2)
    assert after.requests - before.requests == 2 * len(TOPICS)
    assert after.in_flight == 0
    # Every first turn finds the warmed shared prefix, block-aligned.
    assert all(r.cached_tokens >= len(shared) - 128 for r in turn1), [r.cached_tokens for r in turn1]
    # Every second turn finds its own first turn (prompt and answer) in the cache.
    for first, second in zip(turn1, turn2, strict=True):
        assert second.cached_tokens >= first.prompt_tokens - 128, (first, second)
    gained = after.cached_prompt_tokens - before.cached_prompt_tokens
    assert gained == sum(r.cached_tokens for r in turn1 + turn2)
    assert gained > 0.7 * (after.prompt_tokens - before.prompt_tokens)


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_prompt_too_long_fails_alone(vllm_engine):
    engine: VLLMEngine = vllm_engine.engine

    async def too_long_beside_a_good_one():
        return await asyncio.gather(
            engine.chat(TOO_LONG, GREEDY, "long"),
            engine.chat(QUESTION, GREEDY, "fine"),
            return_exceptions=True,
        )

    failed, fine = vllm_engine.run(too_long_beside_a_good_one())
    assert isinstance(failed, PromptTooLong) and "2048" in str(failed)
    assert isinstance(fine, ChatResult) and "paris" in fine.text.lower()
    after = vllm_engine.run(engine.chat(QUESTION, GREEDY, "after"))
    assert after.text == fine.text
    assert engine.stats().in_flight == 0 and engine.stats().failed >= 1


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_clamps_max_tokens_to_the_room_left(vllm_engine):
    engine: VLLMEngine = vllm_engine.engine
    words = 2100
    while True:  # the longest "word word ..." prompt that leaves 8-12 tokens of room
        messages = [{"role": "user", "content": "word " * words}]
        prompt_tokens = len(engine.prompt_token_ids(messages))
        if prompt_tokens <= engine.max_model_len - 8:
            break
        words -= 5
    room = engine.max_model_len - prompt_tokens
    assert 8 <= room <= 12

    result = vllm_engine.run(
        engine.chat(messages, Sampling(temperature=1.0, top_p=1.0, max_tokens=256, seed=3), "nearly-full")
    )
    assert result.prompt_tokens == prompt_tokens
    assert 0 < result.completion_tokens <= room
    assert result.finish_reason == "length" or result.completion_tokens < room


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_same_seed_same_text(vllm_engine):
    engine: VLLMEngine = vllm_engine.engine
    prompt = [{"role": "user", "content": "Write a short poem about the sea."}]

    async def sample(seed: int, request_id: str) -> str:
        return (
            await engine.chat(
                prompt, Sampling(temperature=1.0, top_p=1.0, max_tokens=40, seed=seed), request_id
            )
        ).text

    async def all_samples():
        # The same request id on purpose: the engine must keep concurrent requests apart.
        return await asyncio.gather(
            sample(11, "same"), sample(11, "same"), *(sample(s, "other") for s in (1, 2, 3))
        )

    first, second, *others = vllm_engine.run(all_samples())
    assert first == second and first
    assert len({first, *others}) > 1, "different seeds should give different samples at temperature 1"


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_cancelled_chat_frees_its_slot(vllm_engine):
    engine: VLLMEngine = vllm_engine.engine

    async def cancel_midway():
        before = engine.stats()
        task = asyncio.create_task(
            engine.chat(QUESTION, Sampling(temperature=1.0, top_p=1.0, max_tokens=1000, seed=0), "cancel-me")
        )
        deadline = time.monotonic() + 30
        while engine.stats().in_flight == before.in_flight:
            assert time.monotonic() < deadline, "the chat never became in flight"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return before, engine.stats()

    before, after = vllm_engine.run(cancel_midway())
    assert after.in_flight == before.in_flight and after.requests == before.requests
    assert vllm_engine.run(engine.chat(QUESTION, GREEDY, "after-cancel")).text


# --- OpenAIEngine against a real `vllm serve` -----------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(bundled_model_path, tmp_path_factory, vllm_engine):
    port = free_port()
    log_path: Path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(bundled_model_path), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--enforce-eager", "--enable-prefix-caching",
        "--enable-prompt-tokens-details", "--uvicorn-log-level", "warning",
        # The in-process engine's dtype, so that greedy answers of both engines can be compared.
        "--dtype", vllm_engine.engine.dtype,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log_path.open("wb") as log:
        # Its own session, so that teardown reaches the engine processes it spawns too.
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy within 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield f"{base_url}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


async def with_openai_engine(base_url: str, work):
    engine = OpenAIEngine(base_url, MODEL_NAME, concurrency=8, timeout_seconds=120, max_retries=2)
    await engine.start()
    try:
        return await work(engine)
    finally:
        await engine.shutdown()


@pytest.mark.model
@pytest.mark.vllm
@pytest.mark.e2e  # `vllm serve` runs as a subprocess
def test_openai_engine_against_vllm_serve(vllm_server, vllm_engine):
    local: VLLMEngine = vllm_engine.engine
    long_prefix = [SHARED_SYSTEM, {"role": "user", "content": "Name a river."}]

    async def work(engine: OpenAIEngine):
        answer = await engine.chat(QUESTION, Sampling(temperature=0.0, top_p=1.0, max_tokens=128), "r1")
        short = await engine.chat(QUESTION, Sampling(temperature=0.0, top_p=1.0, max_tokens=3), "r2")
        seeded = [
            await engine.chat(QUESTION, Sampling(temperature=1.0, top_p=1.0, max_tokens=32, seed=9), "r3")
            for _ in range(2)
        ]
        cached = [await engine.chat(long_prefix, GREEDY, "r4") for _ in range(2)]
        await engine.refresh_stats()  # vLLM's own /metrics: the gauges' names are the installed vLLM's
        return answer, short, seeded, cached, engine.stats()

    answer, short, seeded, cached, stats = asyncio.run(with_openai_engine(vllm_server, work))
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.kv_cache_usage is not None and 0 <= stats.kv_cache_usage <= 1

    # Same model, same chat template, greedy: the remote server agrees with the in-process engine.
    expected = vllm_engine.run(
        local.chat(QUESTION, Sampling(temperature=0.0, top_p=1.0, max_tokens=128), "r1-local")
    )
    assert answer.text == expected.text and "paris" in answer.text.lower()
    assert answer.finish_reason == "stop"
    assert answer.prompt_tokens == expected.prompt_tokens == len(local.prompt_token_ids(QUESTION))
    assert answer.completion_tokens == expected.completion_tokens
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert seeded[0].text == seeded[1].text
    assert cached[1].cached_tokens is not None and cached[1].cached_tokens >= 4 * 128
    assert stats.requests == 6 and stats.cached_prompt_tokens >= cached[1].cached_tokens


@pytest.mark.model
@pytest.mark.vllm
@pytest.mark.e2e  # `vllm serve` runs as a subprocess
def test_openai_engine_prompt_too_long_against_vllm_serve(vllm_server):
    async def work(engine: OpenAIEngine):
        with pytest.raises(PromptTooLong):
            await engine.chat(TOO_LONG, GREEDY, "long")
        return await engine.chat(QUESTION, GREEDY, "after")

    after = asyncio.run(with_openai_engine(vllm_server, work))
    assert "paris" in after.text.lower()


@pytest.mark.model
@pytest.mark.vllm
@pytest.mark.e2e  # `vllm serve` runs as a subprocess
def test_openai_engine_clamps_max_tokens_near_a_full_context(vllm_server, vllm_engine):
    """A conversation that leaves 20 tokens of the 2048-token context: the engine asks for the
    room left (a server that refuses the sum answers 400 and fails the whole trajectory), as the
    in-process engine does, and the answer stops there with `length`."""
    local: VLLMEngine = vllm_engine.engine
    filler = "word " * 2000
    # Trim the filler until the rendered conversation leaves 20 tokens for the answer.
    while len(local.prompt_token_ids([{"role": "user", "content": filler}])) > 2048 - 20:
        filler = filler[:-5]
    near_full = [{"role": "user", "content": filler}]
    room = 2048 - len(local.prompt_token_ids(near_full))
    sent: list[dict] = []

    class Recording(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            if request.url.path.endswith("/chat/completions"):
                sent.append(json.loads(request.content))
            return await super().handle_async_request(request)

    async def work():
        engine = OpenAIEngine(vllm_server, MODEL_NAME, max_retries=0, transport=Recording())
        await engine.start()
        try:
            assert engine.max_model_len == 2048  # read from /v1/models at start
            return await engine.chat(
                near_full, Sampling(temperature=1.0, top_p=1.0, max_tokens=256, seed=1), "near-full"
            )
        finally:
            await engine.shutdown()

    result = asyncio.run(work())
    assert [body["max_tokens"] for body in sent] == [room]
    assert result.completion_tokens <= room and result.prompt_tokens == 2048 - room
