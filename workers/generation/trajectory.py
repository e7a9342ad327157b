"""One critique-and-revise trajectory: the initial answer, then R rounds of critique and revision.

```
conv = few_shot_turns + [user: prompt]
initial = chat(conv)                                   # -> rejected
for round in range(R):
    p = principle_for(constitution, prompt_id, round)
    if constitution.no_harm and P(yes | check question about current) < threshold:
        stop                                           # nothing to critique (see below)
    critique = chat(conv + [assistant: current, user: p.critique])
    current  = chat(... + [assistant: critique, user: p.revision])
chosen = current                                       # the final revision
```

The no-harm check (a constitution's `no_harm`): before each critique the model is asked, as a
multiple choice read from its one-token option log-probs like the judge's, whether the answer has
anything the principle would critique. Found nothing before the first round: `keep` ends the
trajectory with the first answer (`no_harm == "kept"`), `helpfulness` runs one round of the
constitution's helpfulness requests instead (`no_harm == "helpfulness"`). Found nothing in a later
round: the revision so far is final.

Everything but `run_trajectory` is a pure function. The conversation only grows, so the engine's
prefix cache makes the shared few-shot turns and each earlier stage nearly free.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cai_dpo.core.constitutions import ConstitutionSpec, Principle
from workers.generation.engines import ChatResult, Engine, Sampling
from workers.scoring.base import normalise
from workers.scoring.judge import INTRO, render_conversation

Message = dict[str, str]


def principle_for(spec: ConstitutionSpec, prompt_id: int, round_index: int) -> Principle:
    """The principle of one round, a function of (prompt id, round) alone, so reruns draw the same."""
    principles = spec.principles
    if spec.principle_sampling == "fixed":
        return spec.principle(spec.fixed_principle) if spec.fixed_principle else principles[0]
    if spec.principle_sampling == "sequential":
        return principles[(prompt_id + round_index) % len(principles)]
    digest = hashlib.sha256(f"{prompt_id}:{round_index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).choice(principles)


def request_seed(base_seed: int | None, prompt_id: int, stage: str) -> int | None:
    """A per-request sampling seed derived from the job's seed, so a rerun samples the same text."""
    if base_seed is None:
        return None
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def few_shot_turns(spec: ConstitutionSpec) -> list[Message]:
    """The constitution's worked examples as chat turns, shared verbatim by every trajectory."""
    turns: list[Message] = []
    for n, example in enumerate(spec.few_shot):
        principle = (
            spec.principle(example.principle)
            if example.principle
            else spec.principles[n % len(spec.principles)]
        )
        turns += [
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.response},
            {"role": "user", "content": principle.critique},
            {"role": "assistant", "content": example.critique},
            {"role": "user", "content": principle.revision},
            {"role": "assistant", "content": example.revision},
        ]
    return turns


def with_few_shot(few_shot: list[Message], prompt: list[Message]) -> list[Message]:
    """Put the few-shot turns after any system message of the prompt, before its first user turn."""
    system = [m for m in prompt[:1] if m["role"] == "system"]
    return system + few_shot + prompt[len(system) :]


# Openers that show the model narrating its task instead of answering (the meta-text flag).
_META_TEXT = re.compile(
    r"^\s*(?:\**\s*)?(?:revision|revised (?:response|answer)|rewritten (?:response|answer)|critique|"
    r"here(?:'s| is) (?:the|a|my) (?:rewritten|revised|new|updated|improved) (?:response|answer|version)|"
    r"(?:the )?(?:rewritten|revised) (?:response|answer|version)(?: is)?)\s*[:\-]",
    re.IGNORECASE,
)
_META_ANYWHERE = re.compile(
    r"here(?:'s| is) (?:the|a|my) (?:rewritten|revised) (?:response|answer)|\brevision\s*:|\bcritique\s*:",
    re.IGNORECASE,
)


def quality_flags(*, rejected: str, chosen: str, finish_reasons: dict[str, str]) -> list[str]:
    """Defects that keep a pair out of exports by default (the pair is still stored)."""
    flags = []
    if not chosen.strip() or not rejected.strip():
        flags.append("empty")
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        flags.append("unchanged")
    if finish_reasons.get("initial") == "length" or finish_reasons.get("final") == "length":
        flags.append("truncated")
    if _META_TEXT.match(chosen) or _META_ANYWHERE.search(chosen):
        flags.append("meta_text")
    return flags


def answer_text(result: ChatResult) -> str:
    """A reply as stored: trimmed, without NUL characters (a byte-level model can emit one; PostgreSQL
    text cannot hold it, and the pair would fail to save on every attempt)."""
    return result.text.replace("\x00", "").strip()


CHECK_OPTIONS = ["A", "B"]  # (A) Yes: something to critique; (B) No
CHECK_PREFIX = "The answer is ("
HELPFULNESS_PRINCIPLE = "helpfulness"  # the principle id a `no_harm.action: helpfulness` round records


def check_messages(prompt: list[Message], answer: str, question: str) -> list[Message]:
    """The no-harm check as one user turn: the conversation (the prompt without few-shot turns,
    then the answer) and the yes/no question as options (A) Yes, (B) No."""
    conversation = [*prompt, {"role": "assistant", "content": answer}]
    text = f"{INTRO}\n\n{render_conversation(conversation)}\n\n{question.strip()}\nOptions:\n(A) Yes\n(B) No"
    return [{"role": "user", "content": text}]


def p_yes(logprobs: dict[str, float]) -> float:
    """P((A) Yes) of a check, normalised over the two options."""
    return normalise({option: logprobs[option] for option in CHECK_OPTIONS})["A"]


@dataclass
class Trajectory:
    """What a finished trajectory stores with its pair."""

    initial: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    finish_reasons: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    )
    timings: dict[str, float] = field(default_factory=dict)
    # The no-harm checks asked (round, principle, p_yes, threshold, found), and what a check that
    # found nothing before the first round led to: "kept" or "helpfulness" (None: it found something,
    # or the constitution has no check).
    checks: list[dict[str, Any]] = field(default_factory=list)
    no_harm: str | None = None

    @property
    def chosen(self) -> str:
        return self.rounds[-1]["revision"] if self.rounds else self.initial

    def add_usage(self, result: ChatResult) -> None:
        self.usage["prompt_tokens"] += result.prompt_tokens
        self.usage["completion_tokens"] += result.completion_tokens
        self.usage["cached_tokens"] += result.cached_tokens or 0

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["principles"] = [r["principle"] for r in self.rounds]
        return record


async def run_trajectory(
    engine: Engine,
    *,
    spec: ConstitutionSpec,
    prompt_id: int,
    prompt: list[Message],
    revisions: int,
    sampling: Sampling,
    few_shot: list[Message] | None = None,
    request_prefix: str = "",
) -> Trajectory:
    """Run one prompt through the initial answer and `revisions` critique-and-revise rounds."""
    started = time.monotonic()
    conv = with_few_shot(few_shot if few_shot is not None else few_shot_turns(spec), prompt)

    async def chat(messages: list[Message], stage: str) -> ChatResult:
        seeded = sampling.model_copy(update={"seed": request_seed(sampling.seed, prompt_id, stage)})
        result = await engine.chat(messages, seeded, request_id=f"{request_prefix}p{prompt_id}-{stage}")
        trajectory.add_usage(result)
        return result

    trajectory = Trajectory(initial="")
    first = await chat(conv, "initial")
    trajectory.initial = answer_text(first)
    trajectory.finish_reasons["initial"] = first.finish_reason
    current = trajectory.initial
    for round_index in range(revisions):
        principle = principle_for(spec, prompt_id, round_index)
        question = spec.check_question(principle)
        if question is not None and spec.no_harm is not None:
            logprobs = await engine.option_logprobs(  # type: ignore[attr-defined]
                check_messages(prompt, current, question),
                CHECK_PREFIX,
                CHECK_OPTIONS,
                f"{request_prefix}p{prompt_id}-r{round_index}-check",
            )
            p = p_yes(logprobs)
            found = p >= spec.no_harm.threshold
            trajectory.checks.append(
                {
                    "round": round_index,
                    "principle": principle.id,
                    "p_yes": p,
                    "threshold": spec.no_harm.threshold,
                    "found": found,
                }
            )
            if not found:
                if round_index > 0:
                    break  # the revision so far has nothing left to critique: it is final
                if spec.no_harm.action == "keep" or spec.no_harm.helpfulness is None:
                    trajectory.no_harm = "kept"
                    break
                trajectory.no_harm = "helpfulness"
                helpful = spec.no_harm.helpfulness
                principle = Principle(
                    id=HELPFULNESS_PRINCIPLE, critique=helpful.critique, revision=helpful.revision
                )
        conv = conv + [
            {"role": "assistant", "content": current},
            {"role": "user", "content": principle.critique},
        ]
        critique = await chat(conv, f"r{round_index}-critique")
        critique_text = answer_text(critique)
        conv = conv + [
            {"role": "assistant", "content": critique_text},
            {"role": "user", "content": principle.revision},
        ]
        revision = await chat(conv, f"r{round_index}-revision")
        current = answer_text(revision)
        trajectory.rounds.append(
            {
                "principle": principle.id,
                "critique": critique_text,
                "revision": current,
                "finish_reasons": {"critique": critique.finish_reason, "revision": revision.finish_reason},
            }
        )
        trajectory.finish_reasons["final"] = revision.finish_reason
        if trajectory.no_harm == "helpfulness":
            break  # one helpfulness round, then the pair is made
    trajectory.timings["seconds"] = round(time.monotonic() - started, 3)
    return trajectory
