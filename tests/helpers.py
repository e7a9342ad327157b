"""Helpers the tests share: HH-RLHF data parsed by the import code, free ports, waiting for a state.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from cai_dpo.core.pair_import import ImportedPair, parse_pair

HH_PATH = Path(__file__).parent / "data" / "hh-rlhf-harmless-test-800.jsonl.gz"


def hh_lines(n: int | None = None) -> list[str]:
    """The first `n` lines of the excerpt: HH-RLHF transcripts, as `/datasets/import` takes them."""
    with gzip.open(HH_PATH, "rt") as handle:
        lines = handle.read().splitlines(keepends=True)
    return lines if n is None else lines[:n]


def hh_pairs(limit: int | None = None) -> list[ImportedPair]:
    """Single-turn HH pairs (one user turn, one answer each), parsed by the import code, in file order."""
    pairs = []
    for line in hh_lines():
        pair = parse_pair(json.loads(line))
        if len(pair.prompt) == 1:
            pairs.append(pair)
        if limit is not None and len(pairs) == limit:
            break
    return pairs


def hh_prompts(n: int, offset: int = 0, max_chars: int = 300) -> list[str]:
    """Distinct first human turns (red-team style prompts) of the excerpt, shorter than `max_chars`."""
    prompts: list[str] = []
    for line in hh_lines():
        first = parse_pair(json.loads(line)).prompt[0]["content"].strip()
        if first not in prompts and len(first) < max_chars:
            prompts.append(first)
        if len(prompts) == n + offset:
            return prompts[offset:]
    raise AssertionError(f"the excerpt has fewer than {n + offset} distinct prompts")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, *, interval: float = 0.2):
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)
