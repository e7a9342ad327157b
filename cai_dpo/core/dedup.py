"""Near-duplicate prompts: exact on the normalised text, then MinHash over word shingles.

Pure functions, no database: `near_duplicates` takes texts in order and says, for each, the index
of the first text it repeats (None for a first occurrence). A job marks its repeats
`duplicate_prompt`; an export with `dedup=prompt` keeps one pair per group (`keep_one_per_group`).

Two texts are near-duplicates when the Jaccard similarity of their sets of word `SHINGLE`-grams
(case, punctuation and whitespace ignored) is at least `threshold`. MinHash signatures with
locality-sensitive hashing (bands of rows) find the candidates without comparing every pair; each
candidate is then checked on its exact shingle sets, so the answer has no false positive, and a
pair at or above the threshold is missed with probability under 1e-4 at the default 0.7.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from cai_dpo.core.pair_flags import words

SHINGLE = 3  # words per shingle: "how do I" ... as the common dedup scripts for short prompts
NUM_PERM = 128
BANDS, ROWS = 32, 4  # NUM_PERM = BANDS * ROWS; a band collides with probability j**ROWS
DEFAULT_THRESHOLD = 0.7

_rng = np.random.default_rng(20240521)  # fixed: the same text gets the same signature everywhere
_A = _rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) | np.uint64(1)  # odd multipliers
_B = _rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)


def normalised(text: str) -> str:
    """The text's words, case and punctuation ignored, joined by single spaces."""
    return " ".join(words(text))


def shingles(text: str, n: int = SHINGLE) -> frozenset[str]:
    """The text's word n-grams; a text shorter than n words is one shingle of all its words."""
    w = words(text)
    if len(w) <= n:
        return frozenset([" ".join(w)])
    return frozenset(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def signature(grams: frozenset[str]) -> np.ndarray:
    """The MinHash signature of a shingle set: per permutation (multiply-add on 64-bit hashes, the
    top 32 bits kept), the least hash of any shingle."""
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big") for g in grams],
        dtype=np.uint64,
    )
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the hash
        permuted = (hashes[:, None] * _A[None, :] + _B[None, :]) >> np.uint64(32)
    return permuted.min(axis=0)


def near_duplicates(texts: Sequence[str], *, threshold: float = DEFAULT_THRESHOLD) -> list[int | None]:
    """For each text, the index of the first earlier text it near-duplicates (the first of its
    group), or None where it is the first. Exact repeats of the normalised text always match."""
    first: list[int | None] = [None] * len(texts)
    exact: dict[str, int] = {}
    grams: list[frozenset[str] | None] = [None] * len(texts)
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i, text in enumerate(texts):
        key = normalised(text)
        if key in exact:
            first[i] = exact[key]
            continue
        grams[i] = shingles(text)
        bands = signature(grams[i]).reshape(BANDS, ROWS)
        candidates: set[int] = set()
        for band, values in enumerate(bands):
            bucket = buckets.setdefault((band, values.tobytes()), [])
            candidates.update(bucket)
            bucket.append(i)
        for j in sorted(candidates):
            earlier = grams[j]
            if earlier is not None and jaccard(grams[i], earlier) >= threshold:
                first[i] = j if first[j] is None else first[j]
                break
        exact[key] = i if first[i] is None else first[i]  # an exact repeat joins the same group
    return first


def keep_one_per_group(
    items: Sequence[tuple[int, str, float | None]], *, threshold: float = DEFAULT_THRESHOLD
) -> set[int]:
    """Of (id, prompt text, margin) items in id order, the ids to keep: one per group of
    near-duplicate prompts, the largest margin (a pair no scorer judged counts as the least),
    the earliest on a tie."""
    groups = near_duplicates([text for _, text, _ in items], threshold=threshold)
    best: dict[int, int] = {}  # group's first index -> index of the item kept
    for i, (_, _, margin) in enumerate(items):
        group = i if groups[i] is None else groups[i]
        kept = best.get(group)
        if kept is None or _rank(margin) > _rank(items[kept][2]):
            best[group] = i
    return {items[i][0] for i in best.values()}


def _rank(margin: float | None) -> float:
    return float("-inf") if margin is None else margin


# --- decontamination ------------------------------------------------------------------------------

CONTAMINATION_N = 8  # words: as `copies_example`; GPT-3's 13 suits long documents, not prompts


class NgramIndex:
    """A benchmark's prompts as word n-grams (case and punctuation ignored), to find training
    prompts that overlap them. A benchmark prompt shorter than n words is kept whole: a training
    prompt that contains its words in a row overlaps it."""

    def __init__(self, texts: Sequence[str], n: int = CONTAMINATION_N):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()
        for text in texts:
            w = words(text)
            if len(w) >= n:
                self.grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
            elif w:
                self.short.add(tuple(w))
        self.short_lengths = sorted({len(s) for s in self.short})

    def overlap(self, text: str) -> str | None:
        """The first run of words `text` shares with the benchmark (joined by spaces), or None."""
        w = words(text)
        for i in range(len(w)):
            gram = tuple(w[i : i + self.n])
            if len(gram) == self.n and gram in self.grams:
                return " ".join(gram)
            for length in self.short_lengths:
                if i + length <= len(w) and (run := tuple(w[i : i + length])) in self.short:
                    return " ".join(run)
        return None
