"""report_to: the metrics metrics.jsonl holds, also in TensorBoard's event files and a wandb run.

TensorBoard is read back with its own EventAccumulator, a wandb run in offline mode with wandb's own
record reader (the package is in the lock: 64 MB, and its 0.31 pins wandb's own beta cwevals). The
sink's calls (init, define_metric, log, finish) and its failures are also held to a fake `wandb`
module that records them, so a change of wandb's API shows as which call it broke.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.training import tiny_run_params
from workers.training.loop import TrainHooks, run_training
from workers.training.reporting import WANDB_ID_FILE, Reporter, ReportingUnavailable


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the one event folder under `folder`, as TensorBoard shows it (a
    resumed run's purged steps left out); a step logged twice would fail here."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    scalars: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at a step: {steps}"
        scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
    return scalars


def _expected(rows: list[dict], eval_before: dict | None, eval_after: dict | None, last: int):
    """What the event files should hold: every metrics.jsonl value at its step, as float32."""
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for name, value in row.items():
            if name != "step":
                expected.setdefault(f"train/{name}", {})[row["step"]] = float(np.float32(value))
    for step, metrics in ((0, eval_before), (last, eval_after)):
        for name, value in (metrics or {}).items():
            expected.setdefault(f"eval/{name}", {})[step] = float(np.float32(value))
    return expected


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class _FakeWandb(types.ModuleType):
    """The calls the wandb sink makes, recorded: init, define_metric, log, finish."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[dict] = []
        self.metrics: list[tuple] = []
        self.finished: list[int] = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def define_metric(self, name, **kwargs):
                fake.metrics.append((name, kwargs))

            def log(self, values):
                fake.logged.append(dict(values))

            def finish(self, exit_code=0):
                fake.finished.append(exit_code)

        return Run()


def _run(output_dir: Path, model_path: Path, pairs, hooks=None, **params):
    return run_training(
        tiny_run_params(**params), model_path=model_path, train_pairs=pairs[:8], eval_pairs=pairs[8:10],
        output_dir=output_dir, hooks=hooks, checkpoint_steps=2,
    )  # fmt: skip


@pytest.mark.model  # a tiny run: real forwards and backwards
def test_tensorboard_and_wandb_get_metrics_jsonls_values_at_each_step(
    tiny_model_path, hh_pairs, tmp_path, monkeypatch
):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "cai-dpo-tests")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    result = _run(tmp_path, tiny_model_path, hh_pairs, report_to=["tensorboard", "wandb"])
    assert result.status == "completed"

    rows = _rows(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 7))
    expected = _expected(rows, result.eval_before, result.eval_after, result.step)
    assert "train/rewards/margins" in expected and "eval/loss" in expected
    assert _scalars(tmp_path / "runs") == expected
    # The event files travel with the model (the artifact store copies the model folder).
    assert _scalars(result.model_dir / "runs") == expected
    assert _rows(result.model_dir / "metrics.jsonl") == rows

    (init,) = fake.inits
    assert init["project"] == "cai-dpo-tests" and init["resume"] == "allow"
    assert init["id"] == (tmp_path / "wandb_run_id").read_text() and init["dir"] == str(tmp_path)
    assert init["config"]["report_to"] == ["tensorboard", "wandb"] and init["config"]["max_steps"] == 6
    assert ("*", {"step_metric": "train/global_step", "step_sync": True}) in fake.metrics
    before, *steps, after = fake.logged
    assert before == {**{f"eval/{k}": v for k, v in result.eval_before.items()}, "train/global_step": 0}
    assert steps == [
        {**{f"train/{k}": v for k, v in row.items() if k != "step"}, "train/global_step": row["step"]}
        for row in rows
    ]
    assert after == {**{f"eval/{k}": v for k, v in result.eval_after.items()}, "train/global_step": 6}
    assert fake.finished == [0]


@pytest.mark.model
def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tiny_model_path, hh_pairs, tmp_path):
    stopped: list[int] = []  # checked once before step 1, then after each step: stops after step 3
    stop_after = TrainHooks(should_stop=lambda: stopped.append(1) or len(stopped) > 3)
    first = _run(tmp_path, tiny_model_path, hh_pairs, stop_after, report_to="tensorboard")
    assert (first.status, first.step) == ("stopped", 3)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2
    assert sorted(_scalars(tmp_path / "runs")["train/loss"]) == [1, 2, 3]

    resumed = _run(tmp_path, tiny_model_path, hh_pairs, report_to="tensorboard")
    assert resumed.status == "completed"
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 7))
    # One event folder; each step once, with the values metrics.jsonl kept (the resumed attempt's
    # for the steps after the checkpoint: its tokens_per_s is its own).
    assert _scalars(tmp_path / "runs") == _expected(rows, resumed.eval_before, resumed.eval_after, 6)


@pytest.mark.unit
def test_a_sink_the_worker_cannot_use_fails_the_run_naming_report_to(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: `import wandb` raises
    with pytest.raises(ReportingUnavailable, match="report_to: wandb is not installed"):
        Reporter.open(["wandb"], tmp_path, config={}, total_steps=1)

    failing = _FakeWandb()
    failing.init = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("api key missing"))
    monkeypatch.setitem(sys.modules, "wandb", failing)
    with pytest.raises(ReportingUnavailable, match="report_to: wandb could not start a run: api key"):
        Reporter.open(["tensorboard", "wandb"], tmp_path, config={}, total_steps=1)


@pytest.mark.unit
def test_no_report_to_leaves_the_hooks_as_they_are(tmp_path):
    hooks = TrainHooks()
    assert Reporter.open([], tmp_path, config={}, total_steps=1).wrap(hooks) is hooks
    assert not (tmp_path / "runs").exists()


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run's .wandb file: wandb's protobuf records in LevelDB's log
    format (blocks of 32 KiB, each record a 7-byte header: checksum, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


@pytest.mark.model
def test_wandb_offline_run_holds_metrics_jsonls_values(tiny_model_path, hh_pairs, tmp_path, monkeypatch):
    """The real package (the lock's): an offline run, nothing sent."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = _run(tmp_path / "run", tiny_model_path, hh_pairs, report_to="wandb")
    run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text()
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    before, *steps, after = _wandb_history(offline)
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [row["train/global_step"] for row in steps] == [row["step"] for row in rows]
    for logged, row in zip(steps, rows, strict=True):
        assert {k: logged[f"train/{k}"] for k in row if k != "step"} == pytest.approx(
            {k: v for k, v in row.items() if k != "step"}
        )
    assert before["eval/loss"] == pytest.approx(result.eval_before["loss"])
    assert (after["train/global_step"], after["eval/loss"]) == (6, pytest.approx(result.eval_after["loss"]))


@pytest.mark.model
def test_a_run_naming_a_sink_its_worker_lacks_fails_before_training(
    tiny_model_path, hh_pairs, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ReportingUnavailable, match="report_to: wandb is not installed on this worker"):
        _run(tmp_path, tiny_model_path, hh_pairs, report_to=["tensorboard", "wandb"])
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "runs").exists()
