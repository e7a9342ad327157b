"""Diffs the console shows: word by word between two answers, line by line between two versions of
a constitution. Pure functions returning segments; the templates escape and mark them up."""

from __future__ import annotations

import difflib
import re
from typing import Literal

Op = Literal["equal", "delete", "insert"]

# Words, runs of whitespace, and single punctuation marks: joined back they give the text exactly.
_TOKENS = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)
_WORD = re.compile(r"\w")
# Past this many tokens on a side, the answers are shown without a diff (difflib is quadratic).
MAX_DIFF_TOKENS = 20_000


def tokens(text: str) -> list[str]:
    return _TOKENS.findall(text)


def word_diff(old: str, new: str) -> list[tuple[Op, str]] | None:
    """Segments turning `old` into `new`: ("equal" | "delete" | "insert", text), in order; the
    equal and deleted ones join to `old`, the equal and inserted ones to `new`. None when too long."""
    a, b = tokens(old), tokens(new)
    if len(a) > MAX_DIFF_TOKENS or len(b) > MAX_DIFF_TOKENS:
        return None
    segments: list[tuple[Op, str]] = []

    def add(op: Op, text: str) -> None:
        if not text:
            return
        if segments and segments[-1][0] == op:
            segments[-1] = (op, segments[-1][1] + text)
        else:
            segments.append((op, text))

    for equal, removed, added in _readable(
        difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes(), a, b
    ):
        if equal:
            add("equal", equal)
        else:
            add("delete", removed)
            add("insert", added)
    return segments


def _trivial(tokens_: list[str]) -> bool:
    """A run too small to keep two changes apart: spaces, punctuation, or one short word."""
    words = [t for t in tokens_ if _WORD.match(t)]
    return len(words) == 0 or (len(words) == 1 and len(words[0]) <= 3)


def _readable(opcodes, a: list[str], b: list[str]) -> list[tuple[str, str, str]]:
    """(equal text, removed text, added text) runs, where a trivial equal run between two changes
    joins them: "~~Sure! Guess the~~ ++I can't help++" rather than alternating word by word."""
    runs: list[list] = []  # [equal tokens] or [None, removed tokens, added tokens]
    for index, (tag, i1, i2, j1, j2) in enumerate(opcodes):
        inner = 0 < index < len(opcodes) - 1
        if tag == "equal" and not (inner and _trivial(a[i1:i2])):
            runs.append([a[i1:i2]])
            continue
        removed, added = a[i1:i2], b[j1:j2]
        if runs and runs[-1][0] is None:
            runs[-1][1] += removed
            runs[-1][2] += added
        else:
            runs.append([None, removed, added])
    return [
        ("".join(run[0]), "", "") if run[0] is not None else ("", "".join(run[1]), "".join(run[2]))
        for run in runs
    ]


def diff_stats(segments: list[tuple[Op, str]]) -> dict[str, int]:
    """Words removed and added (whitespace and punctuation not counted)."""
    counts = {"delete": 0, "insert": 0}
    for op, text in segments:
        if op in counts:
            counts[op] += sum(1 for token in tokens(text) if _WORD.match(token))
    return counts


def line_diff(old: str, new: str, *, context: int = 3) -> list[tuple[str, str]]:
    """A unified diff as (kind, line) rows: kind is "hunk", "delete", "insert" or "equal"."""
    rows: list[tuple[str, str]] = []
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=context)
    for line in lines:
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("@@"):
            rows.append(("hunk", line))
        elif line.startswith("-"):
            rows.append(("delete", line[1:]))
        elif line.startswith("+"):
            rows.append(("insert", line[1:]))
        else:
            rows.append(("equal", line[1:]))
    return rows
