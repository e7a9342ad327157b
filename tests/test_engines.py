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
from tests.helpers import free_port
from workers.generation.engines import (
    ChatResult,
    Engine,
    EngineError,
    OpenAIEngine,
    PromptTooLong,
    Sampling,
    VLLMEngine,
    make_engine,
)

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


@pytest.mark.model
def test_make_engine_picks_the_engine_from_settings(bundled_model_path):
    remote = make_engine(
        Settings(engine="openai", openai_base_url="http://gpu-box:8001/v1", openai_concurrency=5), "my-model"
    )
    assert isinstance(remote, OpenAIEngine) and isinstance(remote, Engine)
    assert remote.model == "my-model" and remote.base_url == "http://gpu-box:8001/v1"
    named = make_engine(Settings(engine="openai", openai_model="served-name"), "my-model")
    assert named.model == "served-name"

    local = make_engine(Settings(engine="vllm", vllm_max_model_len=1024), str(bundled_model_path))
    assert isinstance(local, VLLMEngine) and isinstance(local, Engine)
    assert local.model_path == str(bundled_model_path) and local.max_model_len == 1024


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
        return answer, short, seeded, cached, engine.stats()

    answer, short, seeded, cached, stats = asyncio.run(with_openai_engine(vllm_server, work))

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
