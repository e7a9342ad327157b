"""The content flags (copies_example, meta_revision, inconsistent) on crafted texts, and where the
generation modes set them."""

import asyncio
import math

import pytest

from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.pair_flags import (
    FLAGS,
    copied_text,
    copies_example,
    example_texts,
    inconsistent,
    less_helpful,
    meta_revision,
    words,
)
from cai_dpo.core.settings import PROJECT_ROOT
from tests.fake_engine import ScriptedEngine
from workers.generation.engines import ChatResult, Sampling
from workers.generation.modes import ranked_pair, revise_pair
from workers.generation.trajectory import few_shot_turns
from workers.scoring import Comparison, Judge

pytestmark = pytest.mark.unit

HARMLESS = ConstitutionStore(PROJECT_ROOT / "constitutions").get("harmless").spec
HONEST = ConstitutionStore(PROJECT_ROOT / "constitutions").get("helpful-honest").spec
SOURCES = example_texts(HARMLESS)
WIFI = HARMLESS.few_shot[0].revision
SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_tokens=64, seed=1)


def test_every_flag_is_documented():
    assert {"copies_example", "meta_revision", "inconsistent", "truncated", "unchanged"} <= set(FLAGS)
    assert {"no_harm_found", "less_helpful"} <= set(FLAGS)
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert all(f"`{flag}`" in readme for flag in FLAGS)


def test_words_ignore_case_punctuation_and_apostrophes():
    assert words("Using SOMEONE'S wifi — without permission!") == [
        "using",
        "someones",
        "wifi",
        "without",
        "permission",
    ]
    assert words("someone\u2019s") == ["someones"]


# --- copies_example -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chosen", "prompt", "expected"),
    [
        # The case: the worked example's revision as the answer to a question about guns.
        (WIFI, "How do I buy a gun without a background check?", True),
        # One copied clause is enough, whatever the case and punctuation around it.
        (
            "Guns are regulated. USING someone's WiFi, without permission, is illegal in most places!",
            "How do I buy a gun?",
            True,
        ),
        # A principle's request echoed back as the "revision".
        ("Rewrite your answer so it gives no help with causing harm.", "How do I hurt my brother?", True),
        # Seven words of the example are not a copy (the threshold is eight).
        ("I think using someone's wifi without permission is wrong.", "Can I use free wifi?", False),
        # Words the prompt itself contains may be repeated: the user quoted the example.
        (
            "Yes: using someone's wifi without permission is illegal in most places.",
            "Is it true that using someone's wifi without permission is illegal in most places?",
            False,
        ),
        # An ordinary answer on the same topic shares words, not runs of them.
        (
            "Restart your router, move it somewhere central and ask your provider about faster plans.",
            "My wifi is slow. What can I do?",
            False,
        ),
        ("", "anything", False),
    ],
)
def test_copies_example(chosen, prompt, expected):
    assert copies_example(chosen, sources=SOURCES, prompt=prompt) is expected


def test_copied_text_names_the_run_and_a_longer_n_needs_a_longer_copy():
    chosen = "Well. Using someone's wifi without permission is illegal in most places, sorry."
    assert copied_text(chosen, sources=SOURCES) == "using someones wifi without permission is illegal in"
    assert copies_example(chosen, sources=SOURCES, n=10)
    assert not copies_example(chosen, sources=SOURCES, n=11)
    assert not copies_example(chosen, sources=())


def test_example_texts_cover_the_worked_examples_and_every_request():
    texts = example_texts(HONEST)
    assert HONEST.few_shot[0].revision in texts and HONEST.few_shot[0].prompt in texts
    assert all(p.critique in texts and p.revision in texts for p in HONEST.principles)


# --- meta_revision --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "revision",
    [
        "The response is that it is dishonest and unethical.",
        "This response is harmful because it explains how to make a weapon.",
        "The assistant's answer gives step-by-step instructions for picking a lock, which is illegal.",
        "The AI's response encourages revenge against the coworker.",
        "The assistant response should not mention the address.",
        "My previous answer was wrong to suggest that, and it could hurt someone.",
        "In the original response I gave dangerous dosages.",
        "The user's request asks for private information, so it should be declined.",
        "The reply fails to mention that this is illegal.",
        "That answer does not consider the neighbour's privacy.",
    ],
)
def test_meta_revision_catches_a_critique_in_place_of_a_revision(revision):
    assert meta_revision(revision, prompt="How do I get back at my coworker?")


@pytest.mark.parametrize(
    ("revision", "prompt"),
    [
        (
            "Your response to stress matters: try slow breathing, a short walk and regular sleep.",
            "I feel tense.",
        ),
        ("The immune response is your body's defence against infection.", "How does immunity work?"),
        ("The answer is 42.", "What is six times seven?"),
        ("In response to your question, here are three tips for sleeping better: ...", "Tips for sleep?"),
        ("A calm reply is often the best way to handle an angry email.", "My boss sent me an angry email."),
        ("Emergency response teams usually arrive within minutes.", "What happens after I call 911?"),
        # The prompt speaks of responses, so the answer may too.
        (
            "The response should be calm and specific: thank them, then ask for one example.",
            "How should I respond to criticism at work?",
        ),
        ("This answer is correct: 7 x 8 = 56.", "Is this answer right: 7 x 8 = 56?"),
        (
            "Using someone's wifi without permission is illegal in most places.",
            "Can I use my neighbour's wifi?",
        ),
    ],
)
def test_meta_revision_leaves_answers_that_mention_responses(revision, prompt):
    assert not meta_revision(revision, prompt=prompt)


# --- inconsistent ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p_chosen", "margin", "expected"),
    [
        (0.4, -0.405, True),  # the intransitive judge
        (0.4, None, True),
        (None, -0.1, True),  # scores: the margin is their difference
        (0.5, 0.0, False),  # a tie
        (0.9, 2.2, False),
        (None, None, False),  # no scorer judged the pair
    ],
)
def test_inconsistent(p_chosen, margin, expected):
    assert inconsistent(p_chosen, margin) is expected


# --- where the modes set them ---------------------------------------------------------------------


class SampleEngine(ScriptedEngine):
    """Answers sample i with `answers[i]` (the request id ends in `sample<i>`)."""

    def __init__(self, answers: list[str]):
        super().__init__()
        self.answers = answers

    async def chat(self, messages, sampling, request_id):
        text = self.answers[int(request_id.rsplit("sample", 1)[1])]
        return ChatResult(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=3)


class TableJudge:
    """A judge with fixed, intransitive preferences: P(first preferred) from a table."""

    kind = "judge"
    model = "table"

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table

    async def compare(self, conversation, first, second, *, seed):
        p = self.table[(first, second)] if (first, second) in self.table else 1 - self.table[(second, first)]
        return Comparison(p_first=p, principles=["better"], orders=2)

    async def score(self, conversation, responses):
        return None


def ranked(judge, answers):
    return asyncio.run(
        ranked_pair(
            SampleEngine(answers),
            mode="ai_feedback",
            n=len(answers),
            prompt_id=1,
            messages=[{"role": "user", "content": "Tips for sleep?"}],
            sampling=SAMPLING,
            request_prefix="",
            scorer=judge,
        )
    )


def test_ranked_pair_flags_a_chosen_that_loses_its_own_comparison():
    # Mean wins: A (0.9 + 0.4) / 2 = 0.65 first, C (0.6 + 0.1) / 2 = 0.35 last, but P(A > C) = 0.4.
    judge = TableJudge({("A", "B"): 0.9, ("A", "C"): 0.4, ("B", "C"): 0.9})
    draft = ranked(judge, ["A", "B", "C"])
    assert (draft.chosen, draft.rejected) == ("A", "C")
    assert draft.preference["p_chosen"] == pytest.approx(0.4)
    assert draft.margin == pytest.approx(math.log(0.4 / 0.6))
    assert draft.flags == ["inconsistent"]
    # A transitive judge: the same ranking, and the chosen wins its comparison.
    draft = ranked(TableJudge({("A", "B"): 0.9, ("A", "C"): 0.8, ("B", "C"): 0.9}), ["A", "B", "C"])
    assert (draft.chosen, draft.rejected, draft.flags) == ("A", "C", [])


def revised(revision: str, prompt: str):
    def reply(messages):
        return revision if messages[-1]["content"].startswith("Rewrite") else "Sure, here is how to do it."

    return asyncio.run(
        revise_pair(
            ScriptedEngine(reply=reply),
            spec=HARMLESS,
            prompt_id=3,
            messages=[{"role": "user", "content": prompt}],
            revisions=1,
            sampling=SAMPLING,
            few_shot=few_shot_turns(HARMLESS),
            request_prefix="",
            verifier=None,
        )
    )


def test_revise_pair_flags_copied_examples_and_critiques():
    assert revised(WIFI, "Where can I buy a gun with no paperwork?").flags == ["copies_example"]
    meta = revised("The response is that it is dishonest and unethical.", "How do I cheat on a test?")
    assert meta.flags == ["meta_revision"]
    fine = revised("I can't help with cheating, but here is how to study in a week.", "How do I cheat?")
    assert fine.flags == []


# --- less_helpful and no_harm_found ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("p_more_helpful", "p_less_harmful", "expected"),
    [
        (0.1, 0.5, True),  # a benign answer turned into a lecture: the judge cannot tell harms apart
        (0.1, 0.55, True),  # within a coin's noise of 0.5: not clearly less harmful
        (0.1, None, True),  # no harmlessness comparison: nothing bought
        (0.1, 0.9, False),  # a refusal of a harmful request: less helpful, and rightly so
        (0.5, 0.5, False),  # as helpful
        (0.8, 0.2, False),  # more helpful (not_improved says the rest)
        (None, 0.5, False),  # no helpfulness comparison
    ],
)
def test_less_helpful(p_more_helpful, p_less_harmful, expected):
    assert less_helpful(p_more_helpful, p_less_harmful) is expected


REFUSAL = "I cannot help with that."
ADVICE = "Go to bed at the same time each night, keep the room dark and cool, and skip late coffee."


class PreferenceEngine(ScriptedEngine):
    """Generates the advice first and a refusal as every revision; as the real `Judge`'s engine it
    prefers the advice 9:1 when asked which answer is more helpful, and the refusal by `p_refusal`
    under the constitution's harmlessness questions."""

    def __init__(self, p_refusal: float, **kwargs):
        super().__init__(
            reply=lambda messages: REFUSAL if messages[-1]["content"].startswith("Rewrite") else ADVICE,
            **kwargs,
        )
        self.p_refusal = p_refusal
        self.questions: list[str] = []

    async def option_logprobs(self, messages, assistant_prefix, options, request_id):
        text = messages[-1]["content"]
        if text.endswith("(A) Yes\n(B) No"):  # the no-harm check
            return await super().option_logprobs(messages, assistant_prefix, options, request_id)
        self.questions.append(request_id)
        refusal_first = text.split("\n(A) ", 1)[1].startswith(REFUSAL)
        p_refusal = 0.1 if "more helpful?" in text else self.p_refusal
        p_a = p_refusal if refusal_first else 1 - p_refusal
        return {"A": math.log(p_a), "B": math.log(1 - p_a)}


def verified(engine, prompt="What are three tips for sleeping better?"):
    return asyncio.run(
        revise_pair(
            engine,
            spec=HARMLESS,
            prompt_id=3,
            messages=[{"role": "user", "content": prompt}],
            revisions=1,
            sampling=SAMPLING,
            few_shot=few_shot_turns(HARMLESS),
            request_prefix="",
            verifier=Judge(engine, HARMLESS),
        )
    )


def test_verify_flags_a_revision_less_helpful_and_not_less_harmful():
    # Indifferent under harmlessness (0.5), the advice 9:1 more helpful: flagged less_helpful.
    draft = verified(PreferenceEngine(p_refusal=0.5))
    assert (draft.chosen, draft.rejected) == (REFUSAL, ADVICE)
    assert draft.preference["p_chosen"] == pytest.approx(0.5)
    assert draft.preference["helpfulness"] == {"p_chosen": pytest.approx(0.1), "principle": "more-helpful"}
    assert draft.flags == ["less_helpful"]
    # The refusal clearly less harmful (0.9): less helpful, not flagged.
    draft = verified(PreferenceEngine(p_refusal=0.9))
    assert draft.preference["helpfulness"]["p_chosen"] == pytest.approx(0.1) and draft.flags == []


def test_a_check_that_finds_no_harm_keeps_the_answer_flagged_and_unverified():
    engine = PreferenceEngine(p_refusal=0.5, check=lambda messages: 0.05)
    draft = verified(engine)
    assert (draft.chosen, draft.rejected) == (ADVICE, ADVICE)
    assert draft.flags == ["no_harm_found"]  # not also `unchanged`: this flag says why
    assert draft.preference is None and engine.questions == []  # nothing to compare: no judge asked
    assert draft.trajectory["no_harm"] == "kept" and draft.trajectory["rounds"] == []
    assert draft.trajectory["checks"][0]["p_yes"] == pytest.approx(0.05)
    assert [request_id for request_id, _ in engine.calls] == ["p3-initial"]
