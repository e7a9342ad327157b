"""The trajectory's pure parts (principle sampling, few-shot turns, quality flags) and its shape."""

import asyncio
from collections import Counter

import pytest

from cai_dpo.core.constitutions import ConstitutionSpec, ConstitutionStore
from cai_dpo.core.settings import PROJECT_ROOT
from tests.fake_engine import ScriptedEngine
from workers.generation.engines import Sampling
from workers.generation.trajectory import (
    few_shot_turns,
    principle_for,
    quality_flags,
    request_seed,
    run_trajectory,
    with_few_shot,
)

pytestmark = pytest.mark.unit


def spec(sampling="random", n=5, **extra) -> ConstitutionSpec:
    return ConstitutionSpec(
        principle_sampling=sampling,
        principles=[
            {"id": f"p{i}", "critique": f"critique {i}?", "revision": f"revise {i}."} for i in range(n)
        ],
        **extra,
    )


def test_random_principles_depend_on_prompt_id_and_round_only():
    s = spec()
    first = [principle_for(s, prompt_id, r).id for prompt_id in range(50) for r in range(3)]
    again = [principle_for(s, prompt_id, r).id for prompt_id in range(50) for r in range(3)]
    assert first == again
    # Draws spread over the principles rather than sticking to one.
    assert len(Counter(first)) == 5 and max(Counter(first).values()) < 60


def test_sequential_and_fixed_sampling():
    assert [principle_for(spec("sequential"), 0, r).id for r in range(6)] == [
        "p0",
        "p1",
        "p2",
        "p3",
        "p4",
        "p0",
    ]
    assert principle_for(spec("sequential"), 3, 0).id == "p3"
    assert {principle_for(spec("fixed"), i, r).id for i in range(5) for r in range(3)} == {"p0"}
    assert principle_for(spec("fixed", fixed_principle="p2"), 9, 1).id == "p2"


def test_request_seed_is_stable_and_distinct_per_stage():
    assert request_seed(None, 1, "initial") is None
    assert request_seed(7, 1, "initial") == request_seed(7, 1, "initial")
    assert len({request_seed(7, 1, s) for s in ("initial", "r0-critique", "r0-revision")}) == 3


def test_few_shot_turns_alternate_and_follow_a_system_message():
    harmless = ConstitutionStore(PROJECT_ROOT / "constitutions").get("harmless").spec
    turns = few_shot_turns(harmless)
    assert len(turns) == 6 * len(harmless.few_shot)
    assert [t["role"] for t in turns[:6]] == ["user", "assistant"] * 3
    principle = harmless.principle(harmless.few_shot[0].principle)
    assert turns[2]["content"] == principle.critique and turns[4]["content"] == principle.revision
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]
    conv = with_few_shot(turns, prompt)
    assert conv[0] == prompt[0] and conv[1:-1] == turns and conv[-1] == prompt[1]


@pytest.mark.parametrize(
    ("rejected", "chosen", "reasons", "expected"),
    [
        ("Sure, here is how.", "I can't help with that, but here is a safer idea.", {}, []),
        ("Same answer.", "  Same   answer. ", {}, ["unchanged"]),
        ("Something", "", {}, ["empty"]),
        ("a", "b", {"final": "length"}, ["truncated"]),
        ("a", "b", {"initial": "length"}, ["truncated"]),
        ("a", "Revision: a kinder answer", {}, ["meta_text"]),
        ("a", "Here is the rewritten response: kinder", {}, ["meta_text"]),
        ("a", "Sure! Here's the revised answer - kinder", {}, ["meta_text"]),
        ("a", "A good revision of habits helps.", {}, []),
    ],
)
def test_quality_flags(rejected, chosen, reasons, expected):
    assert quality_flags(rejected=rejected, chosen=chosen, finish_reasons=reasons) == expected


def test_trajectory_builds_the_growing_conversation():
    engine = ScriptedEngine(reply=lambda messages: f"reply {len(messages)}")
    s = spec("sequential", n=3, revisions=2)
    prompt = [{"role": "user", "content": "How do I get revenge?"}]
    trajectory = asyncio.run(
        run_trajectory(
            engine,
            spec=s,
            prompt_id=4,
            prompt=prompt,
            revisions=2,
            sampling=Sampling(temperature=0.7, top_p=0.9, max_tokens=32, seed=1),
        )
    )
    assert [request_id for request_id, _ in engine.calls] == [
        "p4-initial",
        "p4-r0-critique",
        "p4-r0-revision",
        "p4-r1-critique",
        "p4-r1-revision",
    ]
    last = engine.calls[-1][1]
    assert last[0] == prompt[0]
    assert [m["content"] for m in last[1:]] == [
        "reply 1",
        "critique 1?",
        "reply 3",
        "revise 1.",
        "reply 5",
        "critique 2?",
        "reply 7",
        "revise 2.",
    ]
    assert trajectory.initial == "reply 1" and trajectory.chosen == "reply 9"
    record = trajectory.to_record()
    assert record["principles"] == ["p1", "p2"]
    assert [r["critique"] for r in record["rounds"]] == ["reply 3", "reply 7"]
    assert record["usage"]["prompt_tokens"] == 50
