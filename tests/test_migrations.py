"""Alembic migrations upgrade an empty database, match the models, and downgrade cleanly."""

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db import downgrade_database, libpq_url, sqlalchemy_url, upgrade_database
from app.models import Base
from tests.fixtures.db import _with_database


@pytest.fixture
def empty_database(database_url):
    name = f"cai_migrations_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(database_url, name)
    yield url
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def tables(url: str) -> set[str]:
    engine = create_engine(sqlalchemy_url(url))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_matches_models_and_downgrade_empties(empty_database):
    upgrade_database(empty_database)
    assert set(Base.metadata.tables) <= tables(empty_database)
    engine = create_engine(sqlalchemy_url(empty_database))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"
    downgrade_database(empty_database, "base")
    assert tables(empty_database) == {"alembic_version"}
    upgrade_database(empty_database)  # and back up again
    assert set(Base.metadata.tables) <= tables(empty_database)
