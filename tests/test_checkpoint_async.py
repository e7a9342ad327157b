"""Checkpoints written in the background: a write that fails half-way leaves the checkpoint before it,
and a run resumed from that one ends with the weights of the run that was never stopped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.training import tiny_run_params
from workers.training import checkpoint as checkpoint_module
from workers.training.loop import TrainHooks, run_training


def _run(path: Path, model_path: Path, pairs, hooks=None):
    return run_training(
        tiny_run_params(), model_path=model_path, train_pairs=pairs[:8], eval_pairs=pairs[8:10],
        output_dir=path, hooks=hooks, checkpoint_steps=2,
    )  # fmt: skip


@pytest.mark.model  # real forwards and backwards of the tiny model
def test_a_checkpoint_write_that_fails_midway_leaves_the_previous_one_to_resume_from(
    tiny_model_path, hh_pairs, tmp_path, monkeypatch, uninterrupted_tiny_run
):
    whole = uninterrupted_tiny_run(None)
    real_save = checkpoint_module.torch_save
    written: list[int] = []

    def save_failing_at_step_4(value, path: Path) -> None:
        if path.name == "optimizer.pt" and written:  # the second checkpoint (step 4): half a file, then fail
            buffer = io.BytesIO()
            torch.save(value, buffer)
            path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError("no space left on device")
        real_save(value, path)

    monkeypatch.setattr(checkpoint_module, "torch_save", save_failing_at_step_4)
    hooks = TrainHooks(on_checkpoint=lambda step, path: written.append(step))
    with pytest.raises(RuntimeError, match="writing the checkpoint failed") as failure:
        _run(tmp_path, tiny_model_path, hh_pairs, hooks)
    assert isinstance(failure.value.__cause__, OSError)
    assert written == [2]  # reported on the training thread once in place; the one at step 4 never was
    assert (tmp_path / ".checkpoint-tmp" / "optimizer.pt").exists()  # the half-written one, left aside
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2

    monkeypatch.setattr(checkpoint_module, "torch_save", real_save)
    resumed = _run(tmp_path, tiny_model_path, hh_pairs)
    assert (resumed.status, resumed.step) == ("completed", 6)
    record = json.loads((resumed.model_dir / "training_config.json").read_text())
    assert record["resumed_from_step"] == 2
    # What each checkpoint cost (the benchmark reads it): the resumed run wrote one, at step 4, and
    # the training thread's share of it is at most the time until it was in place.
    (timed,) = resumed.data["checkpoints"]
    assert timed["step"] == 4 and 0 < timed["training_thread_s"] <= timed["written_s"]
    assert not (tmp_path / "checkpoint").exists()  # discarded once the model is saved
    want = load_file(whole.model_dir / "model.safetensors")
    got = load_file(resumed.model_dir / "model.safetensors")
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-6), name
