"""Near-duplicate prompts: exact on the normalised text, then MinHash over word shingles.

Pure functions, no database: `near_duplicates` takes texts in order and says, for each, the index
of the first text it repeats (None for a first occurrence). A job marks its repeats
`duplicate_prompt`; an export with `dedup=prompt` keeps one pair per group (`keep_one_per_group`).

Two texts are near-duplicates when the Jaccard similarity of their sets of word `SHINGLE`-grams
(case, punctuation and whitespace ignored) is at least `threshold`. MinHash signatures with
locality-sensitive hashing (bands of rows) find the candidates without comparing every pair; each
candidate is then checked on its exact shingle sets, so the answer has no false positive, and a
pair at or above the threshold is missed with probability under 1e-4 at the default 0.7.

Bands of 4 rows make the search sensitive (a pair at Jaccard 0.45 still shares a band 74% of the
time), which is what keeps that miss rate low, but a templated job ("Prompt number 17: ... topic
5?", thousands of prompts at Jaccard ~0.4 to each other) would then make every prompt a candidate
of every other: 35 s for 10,000 such prompts at job creation. A bucket that `MAX_BUCKET` prompts
already share holds a template's common words, so it offers only its first member (the one a
flood of near-copies of one prompt repeats) and takes no more: the work stays linear, and a true
near-duplicate still meets its original through the bands its own words make.
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
_MIX = _rng.integers(1, 2**63, size=ROWS, dtype=np.uint64) | np.uint64(1)
_CHUNK = 1024  # texts per signature batch
MAX_BUCKET = 32  # prompts a band's bucket takes before it counts as a template's common words


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
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared) if a or b else 1.0


def signatures(grams: Sequence[frozenset[str]]) -> np.ndarray:
    """The MinHash signatures of shingle sets, one row each: per permutation (multiply-add on 64-bit
    hashes, the top 32 bits kept), the least hash of any shingle of the set. Every set is non-empty
    (`shingles` never returns an empty one)."""
    out = np.empty((len(grams), NUM_PERM), dtype=np.uint32)
    for start in range(0, len(grams), _CHUNK):  # bounds the (shingles x permutations) temporary
        chunk = grams[start : start + _CHUNK]
        hashes = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big")
                for s in chunk
                for g in s
            ),
            dtype=np.uint64,
            count=sum(len(s) for s in chunk),
        )
        with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the hash
            permuted = ((hashes[:, None] * _A[None, :] + _B[None, :]) >> np.uint64(32)).astype(np.uint32)
        offsets = np.cumsum([0] + [len(s) for s in chunk[:-1]])
        out[start : start + len(chunk)] = np.minimum.reduceat(permuted, offsets, axis=0)
    return out


def band_keys(signatures: np.ndarray) -> np.ndarray:
    """Per text, one integer per band that its `ROWS` signature values decide (mixed by odd
    multipliers: two bands that differ may share a key now and then, which only adds a candidate
    that the exact check turns away)."""
    with np.errstate(over="ignore"):
        return (signatures.reshape(len(signatures), BANDS, ROWS) * _MIX[None, None, :]).sum(axis=2)


def shared_keys(keys: np.ndarray) -> np.ndarray:
    """Which (text, band) keys another text has too: only those can make a candidate."""
    shared = np.zeros(keys.shape, dtype=bool)
    for band in range(keys.shape[1]):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        shared[:, band] = counts[inverse] > 1
    return shared


def near_duplicates(texts: Sequence[str], *, threshold: float = DEFAULT_THRESHOLD) -> list[int | None]:
    """For each text, the index of the first earlier text it near-duplicates (the first of its
    group), or None where it is the first. Exact repeats of the normalised text always match."""
    first: list[int | None] = [None] * len(texts)
    exact: dict[str, int] = {}
    grams: list[frozenset[str] | None] = [None] * len(texts)
    fresh: list[int] = []  # the texts that are not an exact repeat, in order
    for i, text in enumerate(texts):
        key = normalised(text)
        if key in exact:
            first[i] = exact[key]
            continue
        exact[key] = i
        grams[i] = shingles(text)
        fresh.append(i)
    sigs = signatures([grams[i] for i in fresh]) if fresh else np.empty((0, NUM_PERM), dtype=np.uint32)
    row = np.full(len(texts), -1)
    row[fresh] = np.arange(len(fresh))
    keys = band_keys(sigs)
    shared = shared_keys(keys)
    buckets: list[dict[int, list[int]]] = [{} for _ in range(BANDS)]
    # A text whose every key is its own is nobody's candidate and has none: most texts, skipped.
    for k in np.flatnonzero(shared.any(axis=1)).tolist():
        i = fresh[k]
        candidates: set[int] = set()
        text_keys = keys[k].tolist()
        for band in np.flatnonzero(shared[k]).tolist():
            bucket = buckets[band].setdefault(text_keys[band], [])
            if len(bucket) >= MAX_BUCKET:
                candidates.add(bucket[0])  # a template's bucket: see the module docstring
                continue
            candidates.update(bucket)
            bucket.append(i)
        if not candidates:
            continue
        # The signatures' agreement estimates each candidate's Jaccard (standard error under 0.045
        # with 128 permutations); only those within 0.2 of the threshold (4.5 errors) are checked
        # exactly, so a template's many candidates at ~0.4 cost one vectorised comparison.
        ordered = np.array(sorted(candidates))
        estimate = (sigs[row[ordered]] == sigs[row[i]]).mean(axis=1)
        for j in ordered[estimate >= threshold - 0.2].tolist():
            if jaccard(grams[i], grams[j]) >= threshold:
                first[i] = j if first[j] is None else first[j]
                break
    # An exact repeat joins the group of the text it repeats.
    return [f if f is None or first[f] is None else first[f] for f in first]


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
