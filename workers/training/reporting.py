"""Where people watch runs: each step's metrics and the evaluations, sent where `report_to` says.

metrics.jsonl stays the record; these are copies for the tools people already watch runs in, under
the tags transformers' Trainer gives TRL's metrics (`train/loss`, `train/rewards/margins`, ...,
`eval/...`), so a run here and a run with TRL sit side by side in one dashboard.

- `tensorboard`: event files in `<output_dir>/runs/<date>_<host>/` (transformers' layout), beside
  metrics.jsonl and copied into the model folder with it. Written through every step, so
  `tensorboard --logdir` shows a run as it trains.
- `wandb`: one Weights & Biases run per job, configured by wandb's own environment on the worker
  (WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE, WANDB_DIR, ...).

Only the leader reports (loop.py opens no sink elsewhere). A resumed run goes on in the same event
folder and the same wandb run; the steps it trains again replace the ones logged after its checkpoint.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

RUNS_DIR = "runs"  # TensorBoard's event folders, in the output folder and the model folder alike
WANDB_ID_FILE = "wandb_run_id"


class ReportingUnavailable(RuntimeError):
    """A sink named in report_to cannot be used on this worker: the run fails before training."""


class _Sink(Protocol):
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def evaluation(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self, *, failed: bool = False) -> None: ...


class TensorBoardSink:
    """Scalars in TensorBoard event files, through torch's SummaryWriter (which needs `tensorboard`)."""

    def __init__(self, output_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ReportingUnavailable(
                f"report_to: tensorboard is not installed on this worker ({exc}); pip install tensorboard"
            ) from exc
        self._writer_class = SummaryWriter
        self.runs = output_dir / RUNS_DIR
        self.writer: Any = None

    def _open(self, step: int) -> Any:
        # Opened at the first event, whose step says where a resumed run starts again: a resumed run
        # writes on in its folder, and TensorBoard hides what the earlier attempt logged from there on.
        if self.writer is None:
            earlier = sorted(p for p in self.runs.iterdir() if p.is_dir()) if self.runs.is_dir() else []
            if earlier:
                self.writer = self._writer_class(str(earlier[-1]), purge_step=step)
            else:
                name = f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}"
                self.writer = self._writer_class(str(self.runs / name))
        return self.writer

    def _write(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        writer = self._open(step)
        for name, value in metrics.items():
            writer.add_scalar(f"{prefix}/{name}", value, step)
        writer.flush()  # one small write a step: the files are whole while the run trains, or if it dies

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self._write("train", step, metrics)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self._write("eval", step, metrics)

    def close(self, *, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """One wandb run per job (its id kept in the output folder, so a resumed job continues it)."""

    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ReportingUnavailable(
                f"report_to: wandb is not installed on this worker ({exc}); pip install wandb"
            ) from exc
        id_file = output_dir / WANDB_ID_FILE
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        settings: dict[str, Any] = {"name": output_dir.name, "id": id_file.read_text().strip()}
        if not os.environ.get("WANDB_DIR"):  # wandb's own files beside the run's, not in the cwd
            settings["dir"] = str(output_dir)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "cai-dpo"), config=config, resume="allow", **settings
            )
            # A resumed run logs again the steps after its checkpoint: steps as a metric, as
            # transformers' WandbCallback does, so wandb takes them (its own step only grows).
            self.run.define_metric("train/global_step")
            self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        except Exception as exc:
            raise ReportingUnavailable(f"report_to: wandb could not start a run: {exc}") from exc

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**{f"train/{k}": v for k, v in metrics.items()}, "train/global_step": step})

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**{f"eval/{k}": v for k, v in metrics.items()}, "train/global_step": step})

    def close(self, *, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_left_open: set[Reporter] = set()


class Reporter:
    """The run's sinks, fed through the loop's hooks (`wrap`); no sink for an empty report_to."""

    def __init__(self, sinks: list[_Sink], total_steps: int) -> None:
        self.sinks, self.total_steps = sinks, total_steps

    @classmethod
    def open(
        cls, report_to: list[str], output_dir: Path, *, config: dict[str, Any], total_steps: int
    ) -> Reporter:
        """The sinks `report_to` names (none on a follower rank: it passes []); `config`, the run's
        settings, goes to wandb's run config."""
        # A run that raised never reached its close: its sinks are closed as failed before the next
        # one opens (a wandb run left open would take the next job's metrics).
        for reporter in list(_left_open):
            reporter.close(failed=True)
        sinks: list[_Sink] = []
        try:
            for name in dict.fromkeys(report_to):
                sinks.append(
                    TensorBoardSink(output_dir) if name == "tensorboard" else WandbSink(output_dir, config)
                )
        except Exception:
            for sink in sinks:
                sink.close(failed=True)
            raise
        reporter = cls(sinks, total_steps)
        if sinks:
            _left_open.add(reporter)
        return reporter

    def wrap(self, hooks: Any) -> Any:
        """`hooks` (a TrainHooks) whose on_step and on_eval also report: the metrics metrics.jsonl
        gets, at their step; the evaluation before at step 0, the one after at the last step."""
        if not self.sinks:
            return hooks
        on_step, on_eval = hooks.on_step, hooks.on_eval

        def step(step: int, total: int, metrics: dict[str, float]) -> None:
            for sink in self.sinks:
                sink.step(step, metrics)
            on_step(step, total, metrics)

        def evaluation(when: str, metrics: dict[str, float]) -> None:
            for sink in self.sinks:
                sink.evaluation(0 if when == "before" else self.total_steps, metrics)
            on_eval(when, metrics)

        return dataclasses.replace(hooks, on_step=step, on_eval=evaluation)

    def close(self, *, failed: bool = False) -> None:
        _left_open.discard(self)
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed=failed)


@atexit.register
def _close_left_open() -> None:
    for reporter in list(_left_open):
        reporter.close(failed=True)
