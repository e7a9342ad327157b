"""How many trajectories a generation worker keeps in flight: sized to the engine it drives.

A GPU engine batches hundreds of sequences (vLLM on an H100: 1,024); a worker that keeps fewer
conversations going leaves the GPU waiting, and one that keeps far more only lengthens the
engine's queue (every request waits longer, the leases age, nothing goes faster). The target is
therefore steered by the engine's own occupancy: grow while the engine runs below its batch size
with nothing queued, shrink while its queue is longer than a small margin. On a CPU, or against
an engine that does not say how full it is, the target is a fixed figure (64: what measured
fastest for vLLM on this project's CPU machines).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.generation.engines import EngineStats

FIXED_DEFAULT = 64  # trajectories, where the engine's occupancy is unknown (or on a CPU)
FLOOR = 8


def waiting_margin(max_num_seqs: int) -> int:
    """Requests worth keeping queued in the engine: enough that a finished sequence's slot is
    refilled in the same step, few enough that none waits long (an eighth of its batch)."""
    return max(4, max_num_seqs // 8)


def next_in_flight_target(target: int, *, stats: EngineStats, in_flight: int) -> int:
    """The next target after reading the engine's occupancy (`target` when it says nothing).

    Requests and trajectories are counted alike: a revising trajectory has one request at a time,
    a ranking one (`ai_feedback`) several, and the occupancy rule corrects either.
    """
    if stats.max_num_seqs is None or stats.running is None or stats.waiting is None:
        return target
    margin = waiting_margin(stats.max_num_seqs)
    ceiling = 4 * stats.max_num_seqs + margin
    if stats.waiting > 2 * margin:
        # A long queue: its excess over the margin is trajectories the engine cannot batch now.
        target -= stats.waiting - margin
    elif stats.waiting < margin and in_flight >= target:
        if stats.waiting == 0:
            # Nothing queued and the worker is what limits the engine: add its free slots and the
            # margin (at least a quarter more), so that a large GPU is reached in a few steps.
            free = max(stats.max_num_seqs - stats.running, 0)
            target += max(free + margin, math.ceil(target / 4))
        else:
            # Queued requests with free slots means the batch is as full as the KV cache allows:
            # only the queue is short.
            target += margin - stats.waiting
    return max(FLOOR, min(target, ceiling))


@dataclass
class InFlightTarget:
    """The worker's current target: `fixed` (CAI_MAX_IN_FLIGHT) or steered by `observe`."""

    fixed: int | None
    value: int = FIXED_DEFAULT
    steered: bool = False

    def start(self, stats: EngineStats, *, engine_on_cpu: bool) -> None:
        """Pick the first target for a (re)started engine."""
        if self.fixed is not None:
            self.value, self.steered = self.fixed, False
        elif stats.max_num_seqs is not None and not engine_on_cpu:
            self.value = stats.max_num_seqs + waiting_margin(stats.max_num_seqs)
            self.steered = True
        else:
            self.value, self.steered = FIXED_DEFAULT, False

    def observe(self, stats: EngineStats, *, in_flight: int) -> int:
        if self.steered:
            self.value = next_in_flight_target(self.value, stats=stats, in_flight=in_flight)
        return self.value


class SharedEngineTime:
    """Each trajectory's share of its worker's engine time: while n trajectories are in flight,
    each accrues 1/n of every second (processor sharing).

    Under continuous batching a trajectory's own wall time overlaps with hundreds of others', so
    summing those would count the engine's seconds hundreds of times over; the shares of all the
    trajectories add up to the time the engine had work, which is what a GPU hour costs. A
    trajectory stops accruing when its result is made, not while it waits for its commit.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight = 0
        self.elapsed = 0.0  # seconds one trajectory in flight all along would have accrued
        self.at = clock()

    def _advance(self) -> None:
        now = self.clock()
        if self.in_flight:
            self.elapsed += (now - self.at) / self.in_flight
        self.at = now

    def start(self) -> EngineShare:
        self._advance()
        self.in_flight += 1
        return EngineShare(self, self.elapsed)


@dataclass
class EngineShare:
    """One trajectory's running share of the engine's seconds (`SharedEngineTime`)."""

    shared: SharedEngineTime
    started: float
    seconds: float | None = None

    def stop(self) -> float:
        """Stop accruing (again: no change) and return the seconds accrued."""
        if self.seconds is None:
            self.shared._advance()
            self.shared.in_flight -= 1
            self.seconds = self.shared.elapsed - self.started
        return self.seconds
