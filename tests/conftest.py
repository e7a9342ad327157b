"""Test configuration: the real parts (PostgreSQL, the bundled model, vLLM) as session fixtures."""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.api",
    "tests.fixtures.model",
    "tests.fixtures.engine",
    "tests.fixtures.training",
]
