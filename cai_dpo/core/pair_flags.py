"""The quality flags a pair can carry, and the pure functions behind the content flags.

A flagged pair is stored but left out of `/pairs`, `/export` and training unless
`include_flagged=true`. `FLAGS` names every flag the service sets and what it catches (the API's
schema, the console and README list them from here); the generation worker computes them when it
builds a pair (`workers/generation/modes.py`, `trajectory.quality_flags`).

The functions here read text only: no model, no database, so each is tested on crafted texts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cai_dpo.core.constitutions import ConstitutionSpec

FLAGS: dict[str, str] = {
    "empty": "The chosen or the rejected answer is empty.",
    "unchanged": "The revision is the first answer again (whitespace aside).",
    "truncated": "An answer stopped at max_tokens (often a repetition loop).",
    "meta_text": "The chosen answer narrates its task ('Revision:', 'Here is the rewritten response').",
    "not_improved": "verify: the scorer prefers the first answer to the revision.",
    "copies_example": "The chosen answer repeats 8+ consecutive words of the constitution's worked "
    "examples or principle requests that the prompt does not contain.",
    "meta_revision": "The revision talks about an answer ('the response is ...', 'the assistant's "
    "answer', 'my previous answer') instead of answering: a critique, not a revision.",
    "inconsistent": "ai_feedback / best_of_n: the scorer's own comparison of chosen against rejected "
    "prefers the rejected answer (p_chosen < 0.5), though the n-way ranking put chosen first.",
    "duplicate_prompt": "The prompt near-duplicates an earlier prompt of its job (the same normalised "
    "text, or word 3-gram Jaccard similarity >= 0.7 by MinHash): only the first is kept unflagged.",
    "contaminated": "POST /datasets/decontaminate: the prompt shares a run of 8 words (or all of a "
    "shorter prompt) with a prompt of the benchmark named, so training on it would leak the benchmark.",
    "no_harm_found": "revise with a constitution's no_harm check (action keep): the model found nothing "
    "to critique in its first answer, so it was kept unrevised (chosen = rejected). Stored to record "
    "the prompt's outcome; not a preference to train on.",
    "less_helpful": "verify with a judge: its helpfulness comparison prefers the first answer "
    "(P(revision more helpful) < 0.5) and the revision is not clearly less harmful (the verify "
    "comparison prefers it by less than 0.6).",
}

# --- copies_example -------------------------------------------------------------------------------

# Eight consecutive words. Two independent English texts almost never share an 8-word run by
# chance (short function-word phrases such as "if you have any questions" stay under it; GPT-3's
# contamination check used 13 words on long documents, but answers here are a few sentences), while
# one copied clause of a worked example ("using someone's wifi without permission is illegal in
# most places", 10 words) or of a request ("rewrite your answer so it gives no help") reaches it.
COPY_WORDS = 8

_APOSTROPHES = str.maketrans("", "", "'\u2019")
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The text's words, case and punctuation ignored ("Someone's" and "someones" are one word)."""
    return _WORD.findall(text.casefold().translate(_APOSTROPHES))


def ngrams(text: str, n: int = COPY_WORDS) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


@lru_cache(maxsize=64)
def _source_ngrams(texts: tuple[str, ...], n: int) -> tuple[frozenset[tuple[str, ...]], frozenset[str]]:
    """A constitution's n-grams and words, kept: every pair of a job asks about the same texts."""
    grams = frozenset(gram for text in texts for gram in ngrams(text, n))
    return grams, frozenset(word for gram in grams for word in gram)


def example_texts(spec: ConstitutionSpec) -> tuple[str, ...]:
    """What a generation model sees of a constitution: its worked examples (prompt, response,
    critique, revision) and its principles' critique and revision requests."""
    texts: list[str] = []
    for example in spec.few_shot:
        texts += [example.prompt, example.response, example.critique, example.revision]
    for principle in spec.principles:
        texts += [principle.critique, principle.revision]
    return tuple(texts)


def copied_text(chosen: str, *, sources: Iterable[str], prompt: str = "", n: int = COPY_WORDS) -> str | None:
    """The first run of `n` words of `chosen` that one of `sources` contains and `prompt` does not
    (normalised words, joined by spaces); None where there is none."""
    source, vocabulary = _source_ngrams(tuple(sources), n)
    if not source:
        return None
    w = words(chosen)
    in_prompt: set[tuple[str, ...]] | None = None
    run = 0  # how many words up to i the sources use: a copy needs n in a row
    for i, word in enumerate(w):
        run = run + 1 if word in vocabulary else 0
        if run < n:
            continue
        gram = tuple(w[i - n + 1 : i + 1])
        if gram in source:
            if in_prompt is None:
                in_prompt = ngrams(prompt, n)
            if gram not in in_prompt:
                return " ".join(gram)
    return None


def copies_example(chosen: str, *, sources: Iterable[str], prompt: str = "", n: int = COPY_WORDS) -> bool:
    """The chosen answer copies a run of `n` words from the constitution's texts (`example_texts`)
    that the prompt does not contain (a user who quotes the example is answered in its words)."""
    return copied_text(chosen, sources=sources, prompt=prompt, n=n) is not None


# --- meta_revision --------------------------------------------------------------------------------

_ANSWER = r"(?:response|answer|reply)"
# Every pattern below names one of these.
_NOUNS = ("response", "answer", "reply", "user", "human")
_SELF = r"(?:assistant|ai|chatbot|bot)(?:'s|\u2019s)?|model(?:'s|\u2019s)"
# Phrases that name the assistant's own answer, or the user in the third person: an answer
# speaks to the user, a critique speaks about the exchange. Checked anywhere in the text.
_ABOUT_THE_ANSWER = re.compile(
    rf"\b(?:the|this|that|its|an?)\s+(?:{_SELF})\s+{_ANSWER}\b"  # the assistant's answer, the AI response
    rf"|\b(?:the|my|your)\s+(?:previous|original|initial|earlier|above|prior)\s+{_ANSWER}\b"
    rf"|\b(?:my|your)\s+(?:last|first)\s+{_ANSWER}\b"
    r"|\bthe\s+(?:user|human)(?:'s|\u2019s)\s+(?:request|question|prompt|message|query)\b"
    r"|\bthe\s+(?:user|human)\s+(?:asked|asks|is\s+asking|wants|requested|requests)\b",
    re.IGNORECASE,
)
_JUDGING = (
    r"(?:is|was|does|did|doesn't|didn't|contains|provides|gives|fails|promotes|encourages|suggests|"
    r"seems|appears|could|may|might|should|includes|offers|lacks|violates|uses|states|says|mentions|"
    r"explains|describes|ignores|addresses|correctly|incorrectly|also)"
)
# "The response is ...", "This answer fails to ...": a noun that names the answer, as a sentence's
# subject. "The answer is 42" is an answer, so `answer` counts after this/that only; and where the
# prompt itself speaks of responses, replies or answers ("How should I respond to criticism?") the
# answer may too, so that noun is not counted.
_SUBJECT = {
    "respon": re.compile(rf"\b(?:the|this|that)\s+response\s+{_JUDGING}\b", re.IGNORECASE),
    "repl": re.compile(rf"\b(?:the|this|that)\s+reply\s+{_JUDGING}\b", re.IGNORECASE),
    "answer": re.compile(rf"\b(?:this|that)\s+answer\s+{_JUDGING}\b", re.IGNORECASE),
}


def meta_revision(revision: str, *, prompt: str = "") -> bool:
    """The revision talks about an answer ("The response is dishonest", "the assistant's answer",
    "my previous answer", "the user's request") instead of giving one."""
    lowered = revision.casefold()
    if not any(word in lowered for word in _NOUNS):  # the usual case, checked cheaply
        return False
    if _ABOUT_THE_ANSWER.search(revision):
        return True
    topical = prompt.casefold()
    return any(stem not in topical and pattern.search(revision) for stem, pattern in _SUBJECT.items())


# --- inconsistent ---------------------------------------------------------------------------------


def inconsistent(p_chosen: float | None, margin: float | None = None) -> bool:
    """A ranked pair whose chosen answer loses its own chosen-vs-rejected comparison: with n >= 3
    the ranking is by mean win probability, and an intransitive judge can rank first an answer it
    prefers less than the one ranked last. A tie (0.5, margin 0) is not inconsistent."""
    return (p_chosen is not None and p_chosen < 0.5) or (margin is not None and margin < 0)


# --- less_helpful ---------------------------------------------------------------------------------

# A revision counts as less harmful only where verify's comparison prefers it at least this much:
# a judge with nothing to choose between two harmless answers sits near 0.5 either side of it.
LESS_HARMFUL_MIN = 0.6


def less_helpful(p_more_helpful: float | None, p_less_harmful: float | None) -> bool:
    """verify's helpfulness guard: the judge prefers the first answer for helpfulness
    (`p_more_helpful` < 0.5, the revision's probability) and the revision buys no clear harm
    reduction for it (`p_less_harmful`, verify's own preference for the revision, below
    `LESS_HARMFUL_MIN`). A benign question's answer "revised" into a lecture is both."""
    if p_more_helpful is None or p_more_helpful >= 0.5:
        return False
    return p_less_harmful is None or p_less_harmful < LESS_HARMFUL_MIN
