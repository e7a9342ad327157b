"""A training worker as a group of processes under `torchrun`: one leader, the others follow.

`torchrun --nproc-per-node N -m workers.training` (or `cai-dpo worker train
--nproc-per-node N`, or `accelerate launch`) starts N processes of one worker. Rank 0 is the worker
the service sees: it claims jobs and evaluations, holds the leases, writes metrics, the model and
the database rows. The other ranks never touch the database: they wait for the leader's commands
on a control group (gloo, on the host, with a long timeout, so an idle worker's followers may wait
for days), resolve the job's model on their own host, and train their share of every step with the
leader (`parallel.py`: FSDP2 for full fine-tuning, DDP for LoRA).

Failures. A run that cannot start (no pair left after truncation, a model refused, a checkpoint of
other parameters) fails on every rank at the same point: the ranks agree on it (`Ranks.check`)
and the group stays in step for the next job. Any other failure of a rank leaves the others
inside a collective: that rank exits non-zero, torchrun stops the group (and starts it again with
`--max-restarts`), and the job's lease brings it back to whichever worker claims it next.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from cai_dpo.core.model_sources import resolve_model
from cai_dpo.core.settings import Settings
from workers.training.data import PairExample

log = logging.getLogger(__name__)

T = TypeVar("T")

# Followers wait on the control group while their worker is idle: no training collective's
# timeout applies there.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


class SetupFailed(RuntimeError):
    """A run could not start on some rank; raised on every rank, at the same point."""


@dataclass
class Ranks:
    """This process's place in the group, and the collectives the training loop needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: Any  # a gloo process group: commands, decisions, small Python objects

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any = None) -> Any:
        """The leader's `value` on every rank (the others pass anything, usually None)."""
        box = [value]
        torch_dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(values, value, group=self.control)
        return values

    def check(self, error: BaseException | None) -> None:
        """Every rank passes what went wrong for it (None: nothing); if anything did, every rank
        raises SetupFailed naming each rank's error."""
        errors = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
        if failed:
            texts = {text for _, text in failed}
            if len(texts) == 1 and len(failed) == self.world_size:
                raise SetupFailed(texts.pop()) from error
            raise SetupFailed("; ".join(f"rank {rank}: {text}" for rank, text in failed)) from error

    def barrier(self) -> None:
        torch_dist.barrier(group=self.control)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place, on the training group (NCCL on GPUs): no host sync there."""
        torch_dist.all_reduce(tensor)
        return tensor

    def local_first(self, fn: Callable[[], T]) -> T:
        """`fn` on each host's local rank 0 first, then on the host's other ranks: a model is
        downloaded or prepared once per host, then found ready. Errors are agreed (`check`)."""
        result: Any = None
        error: BaseException | None = None
        if self.local_rank == 0:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - agreed on below
                error = exc
        self.barrier()
        if self.local_rank != 0:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001
                error = exc
        self.check(error)
        return result

    def close(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def launched_world_size() -> int:
    """The number of processes torchrun (or accelerate) started for this worker; 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> Ranks | None:
    """Join the group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, ...); None when alone.

    GPUs: NCCL for training, one GPU per local rank. CPUs: gloo (the tests' setting).
    """
    world = launched_world_size()
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    torch_dist.init_process_group(
        backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None
    )
    control = torch_dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Ranks(rank, world, local_rank, device, control)


# --- the leader's commands ------------------------------------------------------------------------


@dataclass
class TrainCommand:
    """One training run, as the leader hands it to every rank."""

    params: dict[str, Any]
    base_model: str
    trained_path: str | None  # the base model's artifact when it is `train:<id>`
    train_pairs: list[PairExample]
    eval_pairs: list[PairExample]
    output_dir: str
    checkpoint_steps: int


def run_command(ranks: Ranks, command: TrainCommand, settings: Settings, hooks: Any = None) -> Any:
    """Every rank's part of one run: the model resolved on each host, then the sharded trainer."""
    from cai_dpo.core.training_params import TrainParams
    from workers.training.trainer import run_training

    model_path = ranks.local_first(
        lambda: resolve_model(command.base_model, settings, trained_path=command.trained_path)
    )
    return run_training(
        TrainParams.model_validate(command.params),
        model_path=Path(model_path),
        train_pairs=command.train_pairs,
        eval_pairs=command.eval_pairs,
        output_dir=Path(command.output_dir),
        hooks=hooks,
        checkpoint_steps=command.checkpoint_steps,
        ranks=ranks,
    )


def lead(ranks: Ranks, command: TrainCommand, settings: Settings, hooks: Any) -> Any:
    """The leader: hand the run to the followers, then train with them."""
    ranks.broadcast(("train", command))
    return run_command(ranks, command, settings, hooks)


def stop_followers(ranks: Ranks) -> None:
    try:
        ranks.broadcast(("stop", None))
    except Exception as exc:  # noqa: BLE001 - a follower gone already: torchrun ends the group
        log.warning("could not tell the followers to stop (%s)", exc)


def follow(ranks: Ranks, settings: Settings) -> int:
    """A follower's life: run what the leader sends until it says stop; the exit code.

    SIGTERM and SIGINT (torchrun forwards them to every rank) are the leader's to act on: it stops
    the run at the next step, hands the job back and then tells the followers to stop.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: log.info("rank %d: stop signal; waiting for the leader", ranks.rank))
    while True:
        op, command = ranks.broadcast(None)
        if op == "stop":
            log.info("rank %d: stopped by the leader", ranks.rank)
            return 0
        try:
            result = run_command(ranks, command, settings)
            log.info("rank %d: run ended (%s at step %d)", ranks.rank, result.status, result.step)
        except SetupFailed as exc:
            log.warning("rank %d: the run could not start: %s", ranks.rank, exc)
        except Exception:  # noqa: BLE001 - the other ranks may wait inside a collective
            log.exception("rank %d: training failed; leaving the group", ranks.rank)
            return 1
