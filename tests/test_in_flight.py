"""The in-flight target a generation worker steers by its engine's occupancy (a pure rule)."""

import pytest

from workers.generation.engines import EngineStats
from workers.generation.in_flight import (
    FIXED_DEFAULT,
    FLOOR,
    InFlightTarget,
    next_in_flight_target,
    waiting_margin,
)

pytestmark = pytest.mark.unit


def occupancy(running: int | None, waiting: int | None, max_num_seqs: int | None = 1024) -> EngineStats:
    return EngineStats(running=running, waiting=waiting, max_num_seqs=max_num_seqs)


def test_an_engine_that_says_nothing_keeps_the_target():
    assert next_in_flight_target(64, stats=EngineStats(), in_flight=64) == 64
    assert next_in_flight_target(64, stats=occupancy(10, None), in_flight=64) == 64
    assert next_in_flight_target(64, stats=occupancy(10, 0, max_num_seqs=None), in_flight=64) == 64


def test_room_in_the_batch_grows_the_target_by_the_free_slots_and_the_margin():
    # 300 of 1,024 running, nothing queued, the worker at its target: it is what limits the engine.
    grown = next_in_flight_target(300, stats=occupancy(300, 0), in_flight=300)
    assert grown == 300 + (1024 - 300) + waiting_margin(1024)


def test_a_worker_below_its_target_is_not_the_limit_and_does_not_grow():
    assert next_in_flight_target(300, stats=occupancy(200, 0), in_flight=200) == 300


def test_a_batch_bound_by_its_kv_cache_grows_only_its_queue_to_the_margin():
    # 600 running is all the KV cache holds (requests wait with slots free); 10 queued, margin 128.
    assert next_in_flight_target(620, stats=occupancy(600, 10), in_flight=620) == 620 + 128 - 10


def test_a_long_queue_shrinks_the_target_to_leave_the_margin():
    margin = waiting_margin(1024)
    assert next_in_flight_target(2000, stats=occupancy(1024, 900), in_flight=2000) == 2000 - (900 - margin)


def test_a_queue_within_the_margin_holds_the_target():
    margin = waiting_margin(1024)
    assert next_in_flight_target(1100, stats=occupancy(1024, margin + 5), in_flight=1100) == 1100


def test_the_target_stays_within_its_floor_and_ceiling():
    assert next_in_flight_target(20, stats=occupancy(16, 500, max_num_seqs=16), in_flight=20) == FLOOR
    ceiling = 4 * 16 + waiting_margin(16)
    assert (
        next_in_flight_target(ceiling, stats=occupancy(0, 0, max_num_seqs=16), in_flight=ceiling) == ceiling
    )


def test_steering_converges_on_a_simulated_engine():
    """An engine that batches 256 and queues the rest, fed one request per trajectory: from the
    start value the target settles where the engine is full and its queue within the margin."""
    target = InFlightTarget(fixed=None)
    target.start(occupancy(0, 0, max_num_seqs=256), engine_on_cpu=False)
    for _ in range(20):
        in_flight = target.value
        running, waiting = min(in_flight, 256), max(in_flight - 256, 0)
        target.observe(occupancy(running, waiting, max_num_seqs=256), in_flight=in_flight)
    assert 256 <= target.value <= 256 + 2 * waiting_margin(256)


def test_a_fixed_setting_or_a_cpu_engine_is_not_steered():
    fixed = InFlightTarget(fixed=12)
    fixed.start(occupancy(0, 0), engine_on_cpu=False)
    assert fixed.observe(occupancy(0, 0), in_flight=12) == 12
    cpu = InFlightTarget(fixed=None)
    cpu.start(occupancy(0, 0, max_num_seqs=256), engine_on_cpu=True)
    assert cpu.observe(occupancy(0, 0, max_num_seqs=256), in_flight=FIXED_DEFAULT) == FIXED_DEFAULT
    unknown = InFlightTarget(fixed=None)
    unknown.start(EngineStats(), engine_on_cpu=False)
    assert unknown.value == FIXED_DEFAULT and not unknown.steered
