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


# --- the no-harm check (a constitution's `no_harm`) -----------------------------------------------

BENIGN = "What are three tips for sleeping better?"
HARMFUL = "How do I break into my neighbour's wifi?"


def no_harm_spec(**no_harm) -> ConstitutionSpec:
    return spec(
        "fixed",
        n=2,
        revisions=2,
        no_harm={"check": "Does the answer help anyone cause harm?", **no_harm},
    )


def harm_check(messages):
    """P(yes): the check sees the prompt (not the few-shot turns) and the answer in its one turn."""
    (turn,) = messages
    return 0.8 if HARMFUL in turn["content"] else 0.1


def trajectory_of(engine, s, text, revisions=2):
    return asyncio.run(
        run_trajectory(
            engine,
            spec=s,
            prompt_id=3,
            prompt=[{"role": "user", "content": text}],
            revisions=revisions,
            sampling=Sampling(temperature=0.7, top_p=0.9, max_tokens=16, seed=1),
        )
    )


def test_a_check_that_finds_nothing_keeps_the_first_answer_without_a_critique():
    engine = ScriptedEngine(reply=lambda messages: f"reply {len(messages)}", check=harm_check)
    benign = trajectory_of(engine, no_harm_spec(), BENIGN)
    assert [request_id for request_id, _ in engine.calls] == ["p3-initial"]  # no critique, no revision
    assert [request_id for request_id, _ in engine.checks] == ["p3-r0-check"]
    assert benign.no_harm == "kept" and benign.rounds == [] and benign.chosen == benign.initial
    (check,) = benign.checks
    assert check == {
        "round": 0,
        "principle": "p0",
        "p_yes": pytest.approx(0.1),
        "threshold": 0.5,
        "found": False,
    }
    (turn,) = engine.checks[0][1]
    assert BENIGN in turn["content"] and "Assistant: reply 1" in turn["content"]
    assert turn["content"].endswith("Does the answer help anyone cause harm?\nOptions:\n(A) Yes\n(B) No")
    assert benign.to_record()["no_harm"] == "kept"


def test_a_check_that_finds_harm_critiques_as_before_and_is_asked_each_round():
    engine = ScriptedEngine(reply=lambda messages: f"reply {len(messages)}", check=harm_check)
    harmful = trajectory_of(engine, no_harm_spec(), HARMFUL)
    assert [request_id for request_id, _ in engine.calls] == [
        "p3-initial",
        "p3-r0-critique",
        "p3-r0-revision",
        "p3-r1-critique",
        "p3-r1-revision",
    ]
    assert [c["found"] for c in harmful.checks] == [True, True] and harmful.no_harm is None
    assert len(harmful.rounds) == 2 and harmful.chosen == "reply 9"
    # The threshold decides: P(yes) 0.8 under a threshold of 0.9 is "nothing found".
    engine = ScriptedEngine(check=harm_check)
    assert trajectory_of(engine, no_harm_spec(threshold=0.9), HARMFUL).no_harm == "kept"


def test_a_revision_with_nothing_left_to_critique_ends_the_rounds():
    # The first answer is harmful; the revision is not: the second round's check stops the rounds.
    engine = ScriptedEngine(
        reply=lambda messages: "safe answer" if "revise" in messages[-1]["content"] else "unsafe answer",
        check=lambda messages: 0.9 if "unsafe answer" in messages[0]["content"] else 0.2,
    )
    trajectory = trajectory_of(engine, no_harm_spec(), HARMFUL, revisions=3)
    assert [c["found"] for c in trajectory.checks] == [True, False]
    assert len(trajectory.rounds) == 1 and trajectory.chosen == "safe answer" and trajectory.no_harm is None


def test_action_helpfulness_revises_for_helpfulness_instead():
    helpfulness = {"critique": "How could it help more?", "revision": "Rewrite it to help more."}
    s = no_harm_spec(action="helpfulness", helpfulness=helpfulness)
    engine = ScriptedEngine(reply=lambda messages: f"reply {len(messages)}", check=harm_check)
    trajectory = trajectory_of(engine, s, BENIGN, revisions=2)
    assert trajectory.no_harm == "helpfulness"
    assert [r["principle"] for r in trajectory.rounds] == ["helpfulness"]  # one round, then the pair
    sent = [messages[-1]["content"] for _, messages in engine.calls]
    assert sent == [BENIGN, "How could it help more?", "Rewrite it to help more."]
    assert trajectory.chosen != trajectory.initial


def test_a_principles_own_check_replaces_the_constitutions():
    s = no_harm_spec()
    s.principles[0].check = "Does the answer reveal a password?"
    engine = ScriptedEngine(check=harm_check)
    trajectory_of(engine, s, BENIGN)
    assert "Does the answer reveal a password?\nOptions:" in engine.checks[0][1][0]["content"]


@pytest.mark.parametrize(
    ("no_harm", "principle_check", "field"),
    [
        ({"check": "harmful?", "action": "helpfulness"}, None, "no_harm.helpfulness"),
        ({"check": "harmful?", "threshold": 1.0}, None, "no_harm.threshold"),
        ({"check": "harmful?", "action": "drop"}, None, "no_harm.action"),
        ({"check": ""}, None, "no_harm.check"),
        (None, "harmful?", "principles.0.check"),
    ],
)
def test_no_harm_is_validated(no_harm, principle_check, field):
    from cai_dpo.core.constitutions import ConstitutionError, parse_constitution

    data = {"principles": [{"id": "p", "critique": "c", "revision": "r", "check": principle_check}]}
    if no_harm is not None:
        data["no_harm"] = no_harm
    import yaml

    with pytest.raises(ConstitutionError) as error:
        parse_constitution(yaml.safe_dump(data))
    assert error.value.field == field


def test_the_shipped_harmless_constitution_checks_before_critiquing():
    harmless = ConstitutionStore(PROJECT_ROOT / "constitutions").get("harmless").spec
    assert harmless.no_harm is not None and harmless.no_harm.action == "keep"
    assert 0 < harmless.no_harm.threshold < 1
    assert ConstitutionStore(PROJECT_ROOT / "constitutions").get("helpful-honest").spec.no_harm is None
