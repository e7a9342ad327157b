"""This process's place among a worker's training processes, and the collectives the loop needs.

The training loop always runs with a `Ranks`. Alone (`Ranks.single()`) every collective returns at
once and nothing needs torch.distributed; under torchrun (`init_from_env`) the same calls go to the
process group: NCCL (or gloo on CPUs) for tensors, a gloo control group for Python objects.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")

# Followers wait on the control group while their worker is idle: no training collective's
# timeout applies there.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


class SetupFailed(RuntimeError):
    """A run could not start on some rank; raised on every rank, at the same point."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Ranks:
    """This process's place in the group, and the collectives the training loop needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: Any  # a gloo process group: commands, decisions, small Python objects (None alone)

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> Ranks:
        """One process on its own: the leader of a group of one, whose collectives do nothing."""
        return cls(0, 1, 0, torch.device(device) if device is not None else default_device(), None)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.world_size == 1

    def broadcast(self, value: Any = None) -> Any:
        """The leader's `value` on every rank (the others pass anything, usually None)."""
        if self.alone:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        if self.alone:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(values, value, group=self.control)
        return values

    def check(self, error: BaseException | None) -> None:
        """Every rank passes what went wrong for it (None: nothing); if anything did, every rank
        raises SetupFailed naming each rank's error. Alone, the error itself is raised."""
        if self.alone:
            if error is not None:
                raise error
            return
        errors = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
        if failed:
            texts = {text for _, text in failed}
            if len(texts) == 1 and len(failed) == self.world_size:
                raise SetupFailed(texts.pop()) from error
            raise SetupFailed("; ".join(f"rank {rank}: {text}" for rank, text in failed)) from error

    def barrier(self) -> None:
        if not self.alone:
            torch_dist.barrier(group=self.control)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place, on the training group (NCCL on GPUs): no host sync there."""
        if not self.alone:
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
        if not self.alone and torch_dist.is_initialized():
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
