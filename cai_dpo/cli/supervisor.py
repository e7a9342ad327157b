"""Running the service: its processes (API, workers) under one supervisor, and the database they share.

Each process is its own Python module, started by name, so the CLI never imports the API or the
workers. The supervisor starts them in their own sessions (a Ctrl-C in the terminal reaches the
supervisor alone, which stops them in order), writes one log (they inherit its output), restarts
a crashed worker up to 3 times a minute, stops everything when the API crashes or on SIGINT/SIGTERM,
and kills each child's process group at the end, so vLLM's engine process never outlives its worker.

The embedded PostgreSQL (no `DATABASE_URL`): whoever starts it stops it. A command that finds no
server running in `$CAI_DATA_DIR/postgres` starts it, hands its URL to the processes it runs as
`DATABASE_URL` (they never start one of their own), and stops it when it exits, however it was asked
to (Ctrl-C, SIGTERM, a crash of the API). A command that finds one running joins it and leaves it
running; stopping the command that started it stops it for all. A process killed with SIGKILL stops
nothing: `cai-dpo db stop` stops the server it left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from cai_dpo.core.db import embedded_postgres_pid, start_embedded_postgres, stop_embedded_postgres
from cai_dpo.core.settings import Settings

log = logging.getLogger("cai_dpo.supervisor")

SERVICE_MODULES = {
    "api": "cai_dpo.api",
    "generate": "cai_dpo.workers.generation",
    "train": "cai_dpo.workers.training",
}
RESTARTS_PER_MINUTE = 3


def service_module(name: str) -> list[str]:
    """The command line of one of the service's processes (`api`, `generate`, `train`)."""
    return [sys.executable, "-m", SERVICE_MODULES[name]]


@contextlib.contextmanager
def service_database(settings: Settings) -> Iterator[str]:
    """The database URL of the block: `DATABASE_URL`, or the embedded server, started here and
    stopped when the block ends unless it was running already (the module's docstring)."""
    if settings.database_url:
        yield settings.database_url
        return
    joined = embedded_postgres_pid(settings.data_dir)
    if joined:
        log.info("joined the embedded PostgreSQL already running (pid %d); it is left running", joined)
    try:  # a signal while the server starts stops it too
        yield start_embedded_postgres(settings.data_dir, stop_at_exit=False)
    finally:
        if not joined:
            stop_embedded_postgres(settings.data_dir)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C (KeyboardInterrupt), so `finally` blocks run: the database
    started for the block is stopped even when the command is stopped while it starts up."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def kill_group(child: subprocess.Popen) -> None:
    """SIGKILL what is left of a child's process group (it was started as its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


class Supervisor:
    """Runs the service's processes as children; one signal stops them all."""

    def __init__(self, names: list[str], env: dict[str, str]):
        self.commands = {name: service_module(name) for name in names}
        self.env = env
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def start(self, name: str) -> None:
        self.children[name] = subprocess.Popen(self.commands[name], env=self.env, start_new_session=True)
        log.info("started %s (pid %d)", name, self.children[name].pid)

    def stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Until a signal or a crash it cannot mend; returns the exit code (1 after a crash)."""
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        restarts: dict[str, list[float]] = {}
        code = 0
        try:
            for name in self.commands:
                self.start(name)
            while not self.stopping:
                time.sleep(0.2)
                for name, child in list(self.children.items()):
                    if child.poll() is None or self.stopping:
                        continue
                    log.error("%s exited with code %s", name, child.returncode)
                    kill_group(child)  # vLLM's engine process outlives a killed worker otherwise
                    recent = [t for t in restarts.get(name, []) if time.monotonic() - t < 60]
                    if name == "api" or len(recent) >= RESTARTS_PER_MINUTE:
                        log.error("%s cannot be kept running; stopping", name)
                        self.stopping, code = True, 1
                        break
                    restarts[name] = [*recent, time.monotonic()]
                    self.start(name)
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def shutdown(self, timeout: float = 30.0) -> None:
        log.info("stopping %s", ", ".join(self.children))
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, child in self.children.items():
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, timeout)
            kill_group(child)
            child.wait()


def run_service(names: list[str], settings: Settings, prepare: Callable[[str], None] | None = None) -> int:
    """Run the named processes (`api`, `generate`, `train`) until stopped, on the service's
    database; `prepare(url)` runs first (migrations, the model). Returns the exit code."""
    with interruptible(), service_database(settings) as url:
        if prepare is not None:
            prepare(url)
        env = os.environ | {"DATABASE_URL": url, "CAI_HOST": settings.host, "CAI_PORT": str(settings.port)}
        return Supervisor(names, env).run()


def run_alone(name: str, settings: Settings) -> int:
    """One process (`cai-dpo serve`, `cai-dpo worker`). With `DATABASE_URL` there is nothing to own:
    the process replaces this one (exec), so a container's signals and a kill of the command's
    process group reach it directly. Else it runs under the supervisor, which owns the embedded
    database; returns the exit code then."""
    if not settings.database_url:
        return run_service([name], settings)
    env = os.environ | {"CAI_HOST": settings.host, "CAI_PORT": str(settings.port)}
    os.execvpe(sys.executable, service_module(name), env)
