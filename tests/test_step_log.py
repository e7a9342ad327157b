"""Each step's row counts the graphs torch.compile made while it ran (a recompilation past the warm-up)."""

from __future__ import annotations

import json

import pytest
import torch

from workers.training import loop
from workers.training.checkpoint import RunState
from workers.training.dpo import METRIC_NAMES


@pytest.mark.unit
def test_each_step_counts_the_graphs_compiled_while_it_ran(tmp_path, monkeypatch):
    compiled = iter([5, 5, 7, 7])  # at the start, after step 1, after step 2 (two graphs), after step 3
    monkeypatch.setattr(loop, "_graphs_compiled", lambda: next(compiled))
    run = RunState(0, [], None, {})
    step_log = loop._StepLog(
        run, tmp_path / "metrics.jsonl", loop.TrainHooks(), total_steps=3, per_epoch=3,
        flops_per_token=1.0, peak=None, ranks=loop.Ranks.single(), lagged=False, objective="dpo",
    )  # fmt: skip
    for step in (1, 2, 3):
        values = torch.zeros(len(METRIC_NAMES) + 1)
        step_log.finished(loop._PendingStep(step, 1e-3, 10, 2, values))
    assert [row["compiled_graphs"] for row in run.history] == [0, 2, 0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["compiled_graphs"] for row in rows] == [0, 2, 0]


@pytest.mark.unit
def test_graphs_compiled_reads_dynamo_s_counter_once_imported():
    import torch._dynamo.utils as dynamo_utils

    before = loop._graphs_compiled()
    dynamo_utils.counters["stats"]["unique_graphs"] += 1
    try:
        assert loop._graphs_compiled() == before + 1
    finally:
        dynamo_utils.counters["stats"]["unique_graphs"] -= 1
