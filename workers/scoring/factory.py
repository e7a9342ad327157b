"""A scorer from its spec (`ScorerSpec`, as a job names it).

The worker supplies `engine_for(model_name)`: an async callable returning a started engine for that
model (None: the job's own model), so a judge runs on the engine that generates; and
`resolve_path(model_name)`: the local folder of a model name (a prepared model, a folder, or
`train:<id>`). Torch scorers are kept (a few, least recently used first out), so their models load
once and later jobs, and concurrent prompts, share one batcher.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cai_dpo.core.constitutions import ConstitutionSpec
from cai_dpo.core.generation_modes import ScorerSpec
from workers.scoring.base import Scorer
from workers.scoring.judge import Judge, JudgeEngine
from workers.scoring.torch_scorers import (
    ImplicitRewardScorer,
    RewardModelScorer,
    read_training_config,
)

MAX_CACHED_SCORERS = 2

_cache: OrderedDict[tuple[Any, ...], Scorer] = OrderedDict()
_cache_lock = threading.Lock()


def _cached(key: tuple[Any, ...], build: Callable[[], Scorer]) -> Scorer:
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        scorer = _cache[key] = build()
        while len(_cache) > MAX_CACHED_SCORERS:
            _cache.popitem(last=False)  # a job still using it keeps it alive until it finishes
        return scorer


def clear_scorer_cache() -> None:
    with _cache_lock:
        _cache.clear()


def make_scorer(
    spec: ScorerSpec,
    *,
    engine_for: Callable[[str | None], Awaitable[JudgeEngine]],
    constitution_spec: ConstitutionSpec | None,
    resolve_path: Callable[[str], str | Path],
    default_model: str | None = None,
) -> Scorer:
    """The scorer `spec` names. A judge's model defaults to `default_model` (the job's model; None
    passes None on to `engine_for`). Model folders are resolved here, so an unknown model fails
    at once; weights load on first use."""
    if spec.kind == "judge":
        name = spec.model or default_model

        async def engine() -> JudgeEngine:
            return await engine_for(name)

        return Judge(engine, constitution_spec, k=spec.k, chain_of_thought=spec.chain_of_thought, model=name)
    assert spec.model is not None  # ScorerSpec requires it for these kinds
    folder = Path(resolve_path(spec.model))
    if spec.kind == "reward_model":
        return _cached(("reward_model", str(folder)), lambda: RewardModelScorer(folder, model=spec.model))
    trained = read_training_config(folder)
    reference = Path(resolve_path(trained.reference))
    return _cached(
        ("implicit", str(folder), str(reference), trained.beta),
        lambda: ImplicitRewardScorer(folder, reference, trained.beta, model=spec.model),
    )
