"""Alembic migrations upgrade an empty database, match the models, and downgrade cleanly."""

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from cai_dpo.core.db import downgrade_database, libpq_url, sqlalchemy_url, upgrade_database
from cai_dpo.core.tables import Base
from tests.helpers import with_database

pytestmark = pytest.mark.db


@pytest.fixture
def empty_database(database_url):
    name = f"cai_migrations_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(database_url, name)
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


def test_0002_marks_the_pairs_of_watermark_era_automatic_jobs(empty_database):
    upgrade_database(empty_database, "0001")
    pair = (
        "INSERT INTO pairs (id, constitution_name, prompt, chosen, rejected, flags)"
        " VALUES (%s, %s, '[]', 'c', 'r', %s)"
    )
    with psycopg.connect(libpq_url(empty_database), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO train_policies (constitution_name, min_new_pairs, params, last_pair_id)"
            " VALUES ('harmless', 2, '{}', 3)"
        )
        conn.execute(
            "INSERT INTO training_jobs (id, base_model, dataset, params, policy) VALUES"
            " (7, 'm', '{\"constitution\": \"harmless\", \"min_id\": 1, \"max_id\": 3}', '{}', 'harmless')"
        )
        for pair_id, name, flags in [
            (1, "harmless", []),
            (2, "harmless", ["unchanged"]),
            (3, "harmless", []),
            (4, "harmless", []),
            (5, "helpful-honest", []),
        ]:
            conn.execute(pair, (pair_id, name, flags))
    upgrade_database(empty_database)
    with psycopg.connect(libpq_url(empty_database)) as conn:
        marks = dict(conn.execute("SELECT id, policy_train_id FROM pairs ORDER BY id").fetchall())
    assert marks == {1: 7, 2: None, 3: 7, 4: None, 5: None}
    downgrade_database(empty_database, "0001")
    with psycopg.connect(libpq_url(empty_database)) as conn:
        assert conn.execute("SELECT last_pair_id FROM train_policies").fetchall() == [(3,)]


def test_0011_sums_the_usage_of_each_jobs_pairs(empty_database):
    upgrade_database(empty_database, "0010")
    with psycopg.connect(libpq_url(empty_database), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO constitution_versions (id, name, content_hash, body, spec)"
            " VALUES (1, 'harmless', 'h', '', '{}')"
        )
        for job_id in (1, 2):
            conn.execute(
                "INSERT INTO generation_jobs (id, constitution_version_id, constitution_name, model,"
                " revisions, sampling, n_prompts) VALUES (%s, 1, 'harmless', 'm', 1, '{}', 2)",
                (job_id,),
            )
        pair = "INSERT INTO pairs (job_id, prompt, chosen, rejected, usage) VALUES (%s, '[]', 'c', 'r', %s)"
        conn.execute(pair, (1, '{"completion_tokens": 30, "prompt_tokens": 100, "cached_tokens": 0}'))
        conn.execute(pair, (1, '{"completion_tokens": 12, "prompt_tokens": 50, "engine_seconds": 1.5}'))
        conn.execute(pair, (1, None))
    upgrade_database(empty_database)
    with psycopg.connect(libpq_url(empty_database)) as conn:
        usage = conn.execute(
            "SELECT id, generated_tokens, prompt_tokens, engine_seconds, max_generated_tokens, stop_reason"
            " FROM generation_jobs ORDER BY id"
        ).fetchall()
    assert usage == [(1, 42, 150, 1.5, None, None), (2, 0, 0, 0.0, None, None)]
