"""Test configuration: the real parts (PostgreSQL, the bundled model, vLLM) as session fixtures, and
the cost markers (pyproject.toml) with the timeout each one implies."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.api",
    "tests.fixtures.model",
    "tests.fixtures.engine",
    "tests.fixtures.openai_stub",
    "tests.fixtures.training",
]

# What a test costs, cheapest first. `unit` and `db` stand alone (`make test-fast` runs them); the
# costlier three combine: a vLLM test needs the model too, an end-to-end test may need either.
COST_MARKERS = ("unit", "db", "model", "vllm", "e2e")
ALONE = {"unit", "db"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "marker_timeouts",
        "per-marker timeouts, 'marker: seconds'; a test gets the largest of its markers' (else `timeout`)",
        type="linelist",
        default=[],
    )


def marker_timeouts(config: pytest.Config) -> dict[str, float]:
    timeouts = {}
    for line in config.getini("marker_timeouts"):
        name, _, seconds = line.partition(":")
        if name.strip() not in COST_MARKERS:
            raise pytest.UsageError(f"marker_timeouts: {name.strip()!r} is not a cost marker {COST_MARKERS}")
        timeouts[name.strip()] = float(seconds)
    return timeouts


def cost_markers(item: pytest.Item) -> set[str]:
    return {mark.name for mark in item.iter_markers() if mark.name in COST_MARKERS}


def marker_problem(markers: set[str]) -> str | None:
    """Why a test's cost markers contradict themselves, or None if they are consistent."""
    if not markers:
        return f"has no cost marker: give it one of {', '.join(COST_MARKERS)} (pyproject.toml)"
    if markers & ALONE and len(markers) > 1:
        return f"is marked {sorted(markers)}: `unit` and `db` each stand alone (`make test-fast` runs them)"
    if "vllm" in markers and "model" not in markers:
        return "is marked `vllm` without `model`: a vLLM engine loads the bundled model"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test's timeout: its own `@pytest.mark.timeout`, else the largest of its markers'."""
    timeouts = marker_timeouts(config)
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        longest = max((timeouts[m] for m in cost_markers(item) if m in timeouts), default=None)
        if longest is not None:
            item.add_marker(pytest.mark.timeout(longest))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    problem = marker_problem(cost_markers(item))
    if problem is not None:
        pytest.fail(f"{item.nodeid} {problem}", pytrace=False)
