"""Helpers the tests share: HH-RLHF data parsed by the import code, job and pair builders, free
ports, waiting for a state, generation workers run in process (on a scripted engine or the
session's vLLM engine) and as processes.

Test modules import from here (and from tests/fixtures, tests/fake_engine.py), never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from sqlalchemy import Engine, select

from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.db import libpq_url, session_scope
from cai_dpo.core.generation_modes import GenerationMode, Sampling
from cai_dpo.core.pair_import import ImportedPair, parse_pair
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.settings import PROJECT_ROOT, Settings
from cai_dpo.core.tables import Pair, Prompt
from tests.fixtures.model import TEST_MODELS_DIR
from workers.generation.engines import make_engine
from workers.generation.worker import GenerationWorker

MODEL = "smollm2-135m-instruct"

HH_PATH = Path(__file__).parent / "data" / "hh-rlhf-harmless-test-800.jsonl.gz"


def hh_lines(n: int | None = None) -> list[str]:
    """The first `n` lines of the excerpt: HH-RLHF transcripts, as `/datasets/import` takes them."""
    with gzip.open(HH_PATH, "rt") as handle:
        lines = handle.read().splitlines(keepends=True)
    return lines if n is None else lines[:n]


def hh_pairs(limit: int | None = None) -> list[ImportedPair]:
    """Single-turn HH pairs (one user turn, one answer each), parsed by the import code, in file order."""
    pairs = []
    for line in hh_lines():
        pair = parse_pair(json.loads(line))
        if len(pair.prompt) == 1:
            pairs.append(pair)
        if limit is not None and len(pairs) == limit:
            break
    return pairs


def hh_prompts(n: int, offset: int = 0, max_chars: int = 300) -> list[str]:
    """Distinct first human turns (red-team style prompts) of the excerpt, shorter than `max_chars`."""
    prompts: list[str] = []
    for line in hh_lines():
        first = parse_pair(json.loads(line)).prompt[0]["content"].strip()
        if first not in prompts and len(first) < max_chars:
            prompts.append(first)
        if len(prompts) == n + offset:
            return prompts[offset:]
    raise AssertionError(f"the excerpt has fewer than {n + offset} distinct prompts")


def with_database(url: str, name: str) -> str:
    """`url` (any form the settings take) pointed at the database `name` on the same server."""
    return urlunsplit(urlsplit(libpq_url(url))._replace(path=f"/{name}"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    *,
    procs: Sequence[subprocess.Popen] = (),
    interval: float = 0.2,
):
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`; fail
    at once if one of `procs` (the workers the condition waits on) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for proc in procs:
            assert proc.poll() is None, f"process {proc.pid} exited with {proc.returncode} waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)


# --- rows written directly (the API and worker tests write them through the service) -------------


def make_job(db: Engine, settings: Settings, n: int, model: str = MODEL) -> int:
    """A generation job of `n` one-message prompts ("prompt 0", ...) on the harmless constitution."""
    constitution = ConstitutionStore(settings.constitutions_dir).get("harmless")
    with session_scope(db) as session:
        version = constitution_queries.store_constitution_version(session, constitution)
        job = job_queries.create_generation_job(
            session,
            constitution_version=version,
            model=model,
            revisions=1,
            sampling=Sampling(temperature=0.7, top_p=0.95, max_tokens=32),
            options=GenerationMode(),
            metadata={},
            prompts=[[{"role": "user", "content": f"prompt {i}"}] for i in range(n)],
            idempotency_key=None,
            request_hash=None,
        )
        return job.id


def make_training_jobs(db: Engine, n: int, base_model: str = MODEL) -> list[int]:
    """`n` queued training jobs (no pairs behind them: for the queue, not for a trainer)."""
    with session_scope(db) as session:
        return [
            training_queries.create_training_job(
                session, base_model=base_model, dataset={"source": "test"}, params={"max_steps": 1}
            ).id
            for _ in range(n)
        ]


def statuses(db: Engine, table: type = Prompt) -> dict[int, tuple[str, int, str | None]]:
    """Every leased row of `table` (prompts, training jobs): id -> (status, attempts, lease owner)."""
    with session_scope(db) as session:
        return {row.id: (row.status, row.attempts, row.lease_owner) for row in session.scalars(select(table))}


def insert_pairs(db: Engine, n: int, *, flagged_extra: bool = True) -> None:
    """Pairs 1..n ("prompt i", "chosen i", "rejected i", source "test", constitution harmless), and
    with `flagged_extra` one more flagged `unchanged`."""
    with session_scope(db) as session:
        rows = [
            {
                "source": "test",
                "constitution_name": "harmless",
                "prompt": [{"role": "user", "content": f"prompt {i}"}],
                "chosen": f"chosen {i}",
                "rejected": f"rejected {i}",
                "trajectory": {
                    "principles": ["harm"],
                    "rounds": [{"principle": "harm", "critique": f"critique {i}", "revision": f"chosen {i}"}],
                },
                "flags": [],
            }
            for i in range(1, n + 1)
        ]
        if flagged_extra:
            rows.append({**rows[0], "chosen": "same", "rejected": "same", "flags": ["unchanged"]})
        session.execute(Pair.__table__.insert(), rows)


def critique_every_answer(settings: Settings, name: str = "harmless") -> None:
    """The test's copy of a constitution without its no-harm check: every answer is critiqued (for
    tests of the critique-and-revise rounds themselves, whatever the model's check would say)."""
    path = settings.constitutions_dir / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    data.pop("no_harm", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def import_hh(client, n: int) -> None:
    """The first n HH pairs of the test excerpt imported over HTTP (source `hh`, constitution harmless)."""
    response = client.post(
        "/datasets/import",
        content="".join(hh_lines(n)),
        params={"source": "hh", "constitution": "harmless"},
        headers={"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 201, response.text


@contextlib.contextmanager
def training_worker_in_thread(settings: Settings, db: Engine) -> Iterator[list[BaseException]]:
    """The real training worker in a thread of this process while the block runs; yields the list
    its failure lands in (empty while it runs well). Stopped and joined after the block: a worker
    that raised or did not stop fails the test."""
    import threading

    from workers.training.worker import TrainingWorker

    worker = TrainingWorker(settings, db, url=settings.database_url)
    failure: list[BaseException] = []

    def run_worker() -> None:
        try:
            asyncio.run(worker.run())
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failure.append(exc)

    thread = threading.Thread(target=run_worker)
    thread.start()
    try:
        yield failure
    finally:
        worker.stop()  # thread-safe: the worker's loop runs in `thread`
        thread.join(timeout=120)
    assert not thread.is_alive(), "the training worker did not stop"
    assert not failure, failure


def train_to_the_end(client, settings: Settings, db: Engine, body: dict, timeout: float = 600) -> int:
    """POST /train with `body`, then the real training worker in a thread of this process until the
    job has succeeded or failed: its id. A worker that raised fails the test."""
    response = client.post("/train", json=body)
    assert response.status_code == 202, response.text
    train_id = response.json()["train_id"]
    with training_worker_in_thread(settings, db) as failure:
        wait_for(
            lambda: failure or client.get(f"/train/{train_id}").json()["status"] in ("succeeded", "failed"),
            timeout,
            "the training job",
            interval=0.5,
        )
    return train_id


def job_finished(client, job_id: int) -> Callable[[], bool]:
    """`GET /jobs/<id>` says the job is over (done or failed)."""
    return lambda: client.get(f"/jobs/{job_id}").json()["status"] in ("done", "failed")


def pairs_of(db: Engine, job_id: int) -> list[Pair]:
    """The job's pairs, in prompt order."""
    with session_scope(db) as session:
        return list(session.scalars(select(Pair).where(Pair.job_id == job_id).order_by(Pair.prompt_id)))


def prompts_of(db: Engine, job_id: int) -> list[Prompt]:
    """The job's prompt rows, in id order."""
    with session_scope(db) as session:
        return list(session.scalars(select(Prompt).where(Prompt.job_id == job_id).order_by(Prompt.id)))


# --- workers in this process ----------------------------------------------------------------------


def run_until(worker, condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Run `worker` in this thread, on an event loop of its own, until `condition()` holds
    (`running_until`)."""
    asyncio.run(running_until(worker, condition, timeout))


async def running_until(worker, condition: Callable[[], object], timeout: float) -> None:
    """Run `worker` (a worker runtime) on this event loop until `condition()` (called in a thread)
    holds, then stop it and wait for its shutdown. A worker that fails meanwhile fails the wait at
    once with its error; one that has not got there within `timeout` fails it with a TimeoutError."""
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(timeout):
            while not await asyncio.to_thread(condition):
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await task


class SharedEngine:
    """The session's vLLM engine (`vllm_engine` fixture) lent to one in-process worker: the
    worker's start and shutdown leave it running for the next test."""

    def __init__(self, handle):
        self.inner = handle.engine

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def start(self):
        pass

    async def shutdown(self):
        pass


def shared_engine_factory(vllm_engine):
    """An `engine_factory` for an in-process worker: the session's vLLM engine for the bundled
    model, a fresh engine (`make_engine`) for any other (a trained `train:<id>`), so a worker that
    needs the base model beside another starts one engine, not two."""

    def factory(settings: Settings, model: str, trained_path: str | None = None):
        if model == MODEL:
            return SharedEngine(vllm_engine)
        return make_engine(settings, model, trained_path)

    return factory


def run_on_shared_engine(
    vllm_engine,
    settings: Settings,
    db: Engine,
    until: Callable[[], object],
    timeout: float = 600.0,
    **overrides,
) -> GenerationWorker:
    """A generation worker in this process on the session's vLLM engine (`shared_engine_factory`:
    other models get engines of their own), until `until()` holds; `overrides` are settings (16
    trajectories in flight, a 0.2 s poll unless given)."""
    settings = settings.model_copy(update={"max_in_flight": 16, "poll_seconds": 0.2} | overrides)
    worker = GenerationWorker(
        settings, db, url=settings.database_url, engine_factory=shared_engine_factory(vllm_engine)
    )
    vllm_engine.run(running_until(worker, until, timeout), timeout=timeout + 60)
    return worker


# --- generation workers as processes ---------------------------------------------------------------


def start_worker(settings: Settings, **env: str) -> subprocess.Popen:
    """`cai-dpo worker generate` as a process on the test database, its engine on the bundled
    model: leases of 15 s, 4 trajectories in flight, claims of 2; `env` adds or overrides variables.
    With `DATABASE_URL` set the command execs the worker module, so the process is the worker."""
    environment = os.environ | {
        "DATABASE_URL": settings.database_url,
        "CAI_DATA_DIR": str(settings.data_dir),
        "CAI_MODELS_DIR": str(TEST_MODELS_DIR),
        "CAI_LEASE_SECONDS": "15",
        "CAI_POLL_SECONDS": "0.5",
        "CAI_MAX_IN_FLIGHT": "4",
        "CAI_CLAIM_BATCH": "2",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        **env,
    }
    # Its own process group: a kill takes vLLM's engine process with it, as a crashed container's would.
    return subprocess.Popen(
        [sys.executable, "-m", "cai_dpo.cli.main", "worker", "generate"],
        env=environment,
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process and everything in its group (vLLM's engine process with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM (a minute to shut down), then whatever is left of the group is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    kill_group(proc)
