"""What every worker shares: its identity, database calls off the event loop, the one lease keeper,
the heartbeat, the one LISTEN loop and the stop signal.

A worker is an asyncio program. Database calls are synchronous SQLAlchemy run in threads
(`db_call`), so the loop stays free for the heartbeat while the work (a vLLM batch, a training
step in a thread) goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Engine as DBEngine
from sqlalchemy import event

from cai_dpo.core import queue
from cai_dpo.core.db import is_connection_error, libpq_url, run_in_session
from cai_dpo.core.queries import workers as worker_queries
from cai_dpo.core.settings import Settings

log = logging.getLogger(__name__)

DATABASE_EXIT_CODE = 4  # see DatabaseUnavailable


def new_worker_id(role: str) -> str:
    """Unique across hosts and restarts: host, pid and a random suffix."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LeaseKeeper:
    """The leases one worker holds, renewed together; reports each one lost exactly once.

    A held row maps to the token of whatever works on it (an asyncio task, a training run). Only
    rows in the snapshot a renewal was sent with can be lost by it, and only if the same token
    still holds them: a row claimed, or claimed again, while the renewal was in flight is not
    mistaken for a lost one.
    """

    def __init__(
        self,
        kind: queue.WorkKind,
        worker_id: str,
        lease_seconds: float,
        on_lost: Callable[[int, Any], None],
    ) -> None:
        self.kind = kind
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.on_lost = on_lost
        self.held: dict[int, Any] = {}

    def hold(self, row_id: int, token: Any) -> None:
        self.held[row_id] = token

    def drop(self, row_id: int, token: Any) -> None:
        if self.held.get(row_id) is token:
            del self.held[row_id]

    def renew(self, session: Any, snapshot: dict[int, Any]) -> set[int]:
        return queue.renew(
            session,
            self.kind,
            worker_id=self.worker_id,
            ids=list(snapshot),
            lease_seconds=self.lease_seconds,
        )

    def settle(self, snapshot: dict[int, Any], still_held: set[int]) -> None:
        for row_id, token in snapshot.items():
            if row_id not in still_held and self.held.get(row_id) is token:
                del self.held[row_id]
                self.on_lost(row_id, token)


class StatementCounter:
    """Statements this worker's database engine sent (its LISTEN connection aside)."""

    def __init__(self, db: DBEngine) -> None:
        self.db = db
        self.count = 0
        event.listen(db, "before_cursor_execute", self._count)

    def _count(self, *_: Any) -> None:
        self.count += 1  # exact enough for a figure read by the heartbeat

    def close(self) -> None:
        """Stop counting (a process that runs several workers on one engine, as the tests do)."""
        if event.contains(self.db, "before_cursor_execute", self._count):
            event.remove(self.db, "before_cursor_execute", self._count)


class DatabaseUnavailable(RuntimeError):
    """The database stayed out of reach for `CAI_DB_OUTAGE_SECONDS`: the worker exits (code 4) for
    its supervisor to restart it; the leases it held run out and its work is claimed again."""


class WorkerRuntime:
    """Identity, heartbeat, leases, LISTEN and stop handling of one worker process."""

    role = "worker"

    def __init__(self, settings: Settings, db: DBEngine, *, url: str, kind: queue.WorkKind) -> None:
        self.settings = settings
        self.db = db
        self.url = url
        self.kind = kind
        self.id = new_worker_id(self.role)
        self.leases = LeaseKeeper(kind, self.id, settings.lease_seconds, self.lease_lost)
        # Keepers of the other kinds of work this worker takes (a training worker: evaluations).
        self.keepers = {kind.name: self.leases}
        self.stopping = asyncio.Event()
        # The same stop as a thread-safe flag, for work that runs in threads (training steps).
        self.stop_requested = threading.Event()
        self.wakeup = asyncio.Event()
        # Why this worker cannot work right now (engine dead, ...): reported in /workers and /health.
        self.problem: str | None = None
        # A database outage in progress (calls are being retried), and one waited out in vain.
        self.database_lost = False
        self.database_gone = False
        # The process's exit code: non-zero asks its supervisor for a fresh process.
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.statements = StatementCounter(db)

    # --- to be provided by each worker ------------------------------------------------------

    def lease_lost(self, row_id: int, token: Any) -> None:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """The heartbeat row: the `workers` table's columns."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------

    def keeper(self, kind: queue.WorkKind) -> LeaseKeeper:
        """The lease keeper of `kind`, renewed by the same heartbeat as every other."""
        if kind.name not in self.keepers:
            self.keepers[kind.name] = LeaseKeeper(kind, self.id, self.settings.lease_seconds, self.lease_lost)
        return self.keepers[kind.name]

    def base_status(self, **values: Any) -> dict[str, Any]:
        # CPU time and statements since start, so that a benchmark (or an operator) can divide
        # them by the work done: the worker's own cost, apart from the engine's and the database's.
        stats = values.pop("stats", {}) | {
            "problem": self.problem,
            "cpu_seconds": round(time.process_time(), 3),
            "db_statements": self.statements.count,
        }
        return {
            "id": self.id,
            "kind": self.role,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "stats": stats,
        } | values

    async def db_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(session, ...)` in a transaction of its own, in a thread.

        A lost connection (the database restarting) is the infrastructure's fault, never the
        work's: the call is retried with backoff for up to `CAI_DB_OUTAGE_SECONDS`, the work in
        hand kept, and then `DatabaseUnavailable` ends the worker. Every call is safe to repeat:
        a write that did commit before its connection broke finds its lease settled and does
        nothing the second time (`queue.finish`, the result's unique prompt id).
        """
        deadline = None
        delay = 0.25
        while True:
            try:
                result = await asyncio.to_thread(run_in_session, self.db, fn, *args, **kwargs)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                now = time.monotonic()
                if self.database_gone:  # already given up: the shutdown's calls try once
                    raise DatabaseUnavailable(str(exc)) from exc
                deadline = deadline or now + self.settings.db_outage_seconds
                if now >= deadline:
                    self.database_gone = True
                    raise DatabaseUnavailable(
                        f"no database connection for {self.settings.db_outage_seconds:g} s "
                        f"(CAI_DB_OUTAGE_SECONDS): {exc.__class__.__name__}"
                    ) from exc
                if not self.database_lost:
                    log.warning("database connection lost (%s); retrying, work kept", exc.__class__.__name__)
                    self.database_lost = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.database_lost:
                log.info("database connection back")
                self.database_lost = False
            return result

    def stop(self) -> None:
        """Stop claiming and hand back what is held; safe to call from any thread."""
        self.stop_requested.set()
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self.stopping.set)
        else:
            self.stopping.set()

    def give_up(self, exc: DatabaseUnavailable) -> None:
        """Stop for good on a database that did not come back: exit code 4, for the supervisor."""
        if not self.exit_code:
            log.error("exiting: %s", exc)
            self.exit_code = DATABASE_EXIT_CODE
        self.stop()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def report(self) -> None:
        """Write the heartbeat row now (a change of health must not wait for the next beat)."""
        await self.db_call(worker_queries.record_worker_heartbeat, **self.status())

    async def heartbeat_loop(self) -> None:
        """Renew the leases held and report this worker, every third of a lease."""
        interval = self.settings.lease_seconds / 3
        last_renewal = time.monotonic()
        while True:
            try:
                snapshots = {name: dict(keeper.held) for name, keeper in self.keepers.items()}

                def renew_and_report(session: Any, snapshots: dict = snapshots) -> dict[str, set[int]]:
                    held = {name: self.keepers[name].renew(session, snap) for name, snap in snapshots.items()}
                    # Off the claim path: rows nobody may claim any more reach their final state.
                    queue.expire(session, self.kind, max_attempts=self.settings.max_attempts)
                    worker_queries.record_worker_heartbeat(session, **self.status())
                    return held

                still_held = await self.db_call(renew_and_report)
                for name, snapshot in snapshots.items():
                    self.keepers[name].settle(snapshot, still_held[name])
                # A starved host (CPU, database) shows here before leases start to run out.
                now = time.monotonic()
                if now - last_renewal > 2 * interval:
                    log.warning(
                        "leases renewed %.1f s apart (CAI_LEASE_SECONDS=%g); a longer lease avoids "
                        "work moving to other workers",
                        now - last_renewal,
                        self.settings.lease_seconds,
                    )
                last_renewal = now
            except DatabaseUnavailable as exc:
                self.give_up(exc)
                return
            except Exception:  # noqa: BLE001 - a database blip must not kill the heartbeat
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    async def listen_loop(self) -> None:
        """LISTEN on this kind's channel so an idle worker wakes at once; polling is the fallback."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    libpq_url(self.url), autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {self.kind.channel}")
                    async for _ in conn.notifies():
                        self.wakeup.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("LISTEN connection lost (%s); polling until it is back", exc)
                await asyncio.sleep(self.settings.poll_seconds)

    async def wait_for_work(self, *also: asyncio.Future) -> None:
        """Sleep until a NOTIFY, a stop, one of `also` (e.g. a finished task), or the poll interval."""
        waiters = [asyncio.create_task(self.wakeup.wait()), asyncio.create_task(self.stopping.wait())]
        await asyncio.wait(
            [*waiters, *also], timeout=self.settings.poll_seconds, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in waiters:
            waiter.cancel()

    def start_background(self) -> list[asyncio.Task]:
        self._loop = asyncio.get_running_loop()
        return [asyncio.create_task(self.heartbeat_loop()), asyncio.create_task(self.listen_loop())]

    async def stop_background(self, tasks: list[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.report()  # the final figures (pairs, CPU, statements) stay readable
            await self.db_call(worker_queries.mark_worker_stopped, self.id)
        except DatabaseUnavailable:  # its heartbeat row goes stale instead
            log.warning("could not mark worker %s stopped: no database", self.id)
        finally:
            self.statements.close()
