"""A training worker as a group of processes under `torchrun`: one leader, the others follow.

`torchrun --nproc-per-node N -m workers.training` (or `cai-dpo worker train
--nproc-per-node N`, or `accelerate launch`) starts N processes of one worker. Rank 0 is the worker
the service sees: it claims jobs and evaluations, holds the leases, writes metrics, the model and
the database rows. The other ranks never touch the database: they wait for the leader's commands
on a control group (gloo, on the host, with a long timeout, so an idle worker's followers may wait
for days), resolve the job's model on their own host, and train their share of every step with the
leader (the one loop, `loop.run_training`, once per stage: `loop.run_stages`, with their `Ranks`).

Failures. A run that cannot start (no pair left after truncation, a model refused, a checkpoint of
other parameters) fails on every rank at the same point: the ranks agree on it (`Ranks.check`)
and the group stays in step for the next job. Any other failure of a rank leaves the others
inside a collective: that rank exits non-zero, torchrun stops the group (and starts it again with
`--max-restarts`), and the job's lease brings it back to whichever worker claims it next.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_dpo.core.model_sources import resolve_model
from cai_dpo.core.settings import Settings
from cai_dpo.core.training_params import TrainParams
from workers.training.data import PairExample
from workers.training.loop import TrainHooks, TrainResult, run_stages
from workers.training.ranks import Ranks, SetupFailed

log = logging.getLogger(__name__)


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


def run_command(
    ranks: Ranks, command: TrainCommand, settings: Settings, hooks: TrainHooks | None = None
) -> TrainResult:
    """Every rank's part of one run: the model resolved on each host, then the loop with the group."""
    model_path = ranks.local_first(
        lambda: resolve_model(command.base_model, settings, trained_path=command.trained_path)
    )
    return run_stages(
        TrainParams.model_validate(command.params),
        model_path=Path(model_path),
        train_pairs=command.train_pairs,
        eval_pairs=command.eval_pairs,
        output_dir=Path(command.output_dir),
        hooks=hooks,
        checkpoint_steps=command.checkpoint_steps,
        ranks=ranks,
    )


def lead(ranks: Ranks, command: TrainCommand, settings: Settings, hooks: TrainHooks) -> TrainResult:
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
