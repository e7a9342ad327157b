"""Shared by the benchmarks: a real `cai-dpo serve` process on a free port with its own database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_service(*, workers: bool = False, env: dict[str, str] | None = None, timeout: float = 300):
    """`cai-dpo serve` (or `up` with workers) on a fresh embedded database in a temporary folder.

    Yields (base URL, process, database URL).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cai-bench-") as data:
        environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        environment |= {"CAI_DATA_DIR": data, "CAI_MODELS_DIR": str(ROOT / "data" / "models")} | (env or {})
        # The database is started here so the benchmark can write to it directly as well.
        sys.path.insert(0, str(ROOT))
        from cai_dpo.core.db import start_embedded_postgres, upgrade_database

        db_url = start_embedded_postgres(Path(data))
        upgrade_database(db_url)
        environment["DATABASE_URL"] = db_url
        command = ["up"] if workers else ["serve"]
        if workers:
            command += ["--no-train-worker"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cai_dpo.cli.main", *command, "--port", str(port)],
            env=environment,
            cwd=ROOT,
            stdout=sys.stderr,  # the service's log; a benchmark's stdout is its JSON figures
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    health = httpx.get(f"{url}/health", timeout=5).json()
                    if not workers or health["workers"].get("generate"):
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the service did not start")
                time.sleep(0.5)
            yield url, proc, db_url
        finally:
            proc.terminate()
            proc.wait(timeout=120)
            stop_embedded_postgres(Path(data))


def stop_embedded_postgres(data: Path, timeout: float = 30) -> None:
    """A fast shutdown of the server in `data/postgres` if it still runs: pgserver stops it only when
    every process that joined it exits normally, and a worker killed by a signal never does; left
    running, it would outlive its folder, removed next."""
    from cai_dpo.core.db import embedded_postgres_pid

    if (pid := embedded_postgres_pid(data)) is None:
        return
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while embedded_postgres_pid(data) is not None and time.monotonic() < deadline:
        time.sleep(0.2)


def insert_bench_pairs(db_url: str, n: int) -> None:
    """`n` stored pairs (about 700 bytes each) made in one statement, for the routes that read pairs."""
    from sqlalchemy import create_engine, text

    from cai_dpo.core.db import sqlalchemy_url

    db = create_engine(sqlalchemy_url(db_url))
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO pairs (source, constitution_name, prompt, chosen, rejected, trajectory, flags) "
                "SELECT 'bench', 'harmless', jsonb_build_array(jsonb_build_object('role', 'user', "
                "'content', 'prompt ' || i)), repeat('chosen ', 40) || i, repeat('rejected ', 40) || i, "
                "'{}'::jsonb, '{}'::text[] FROM generate_series(1, :n) AS i"
            ),
            {"n": n},
        )
    db.dispose()
