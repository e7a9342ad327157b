"""Alembic environment: runs migrations online, one process at a time (advisory lock)."""

from alembic import context
from sqlalchemy import create_engine, pool, text

from cai_dpo.core.tables import Base

# Several processes (API, workers) upgrade on start; the lock makes the others wait, then no-op.
_MIGRATION_LOCK = 0x6361_6964_706F


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
            connection.commit()


run_migrations_online()
