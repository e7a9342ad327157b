"""The generation ceiling: the whole service (API, PostgreSQL, workers) against an engine that
answers at once, so every cost measured is the service's own.

    python bench/ceiling.py                       # the default matrix (make bench-ceiling)
    python bench/ceiling.py --dry-run             # one tiny run of each path, in seconds
    python bench/ceiling.py --paths scripted --in-flight 64,256,1024 --modes revise1 --prompts 4000
    python bench/ceiling.py --full                # every path x in-flight x mode x workers

Two engine paths:
  scripted  generation workers started by this script (`--worker-process`): the real
            `GenerationWorker` with an in-process engine that answers every chat, continuation
            and judge log-prob request at once (short text, different per request; judge
            log-probs from a hash of each option, so rankings are well defined).
  openai    real `cai-dpo worker generate` processes with `CAI_ENGINE=openai` against a stub
            OpenAI-compatible server in its own process (`--stub-server`: asyncio + httptools,
            uvloop if installed; `/v1/models` with `max_model_len`, `/tokenize`,
            `/v1/chat/completions` incl. one-token judge requests with `top_logprobs`). The
            stub's CPU competes for the same cores and is reported too.

One `cai-dpo serve` on a fresh embedded PostgreSQL serves every run. Each run starts its
workers (`CAI_MAX_IN_FLIGHT` = the run's in-flight), waits for their first heartbeat (engine
ready: start-up is not timed), submits one fresh job with `POST /generate`, reads the database
every `--poll` seconds until no prompt of the job is queued or running, then stops the workers
with SIGTERM. Per run, one JSON line:

  pairs_per_s          pairs / (last `finished_at` - the moment of submission)
  steady_pairs_per_s   pairs finished between the 10th and 90th percentile of `finished_at` over
                       that time (no ramp, no tail); null over fewer than 4 commits
  pairs_per_commit     prompts per distinct `finished_at` (one per committing transaction)
  finished_by_tenth    prompts finished in each tenth of the run: a rate that falls shows here
  worker_cpu_ms_per_pair, api_/db_/stub_cpu_ms_per_pair: CPU time from /proc (utime + stime)
                       between submission and the end; PostgreSQL is the postmaster and every
                       backend (live ones, and exited ones through the postmaster's cutime)
  *_cpu_util           that CPU over the run's wall time (cores busy; the machine's count is
                       `cores`)
  db_xact_per_pair, db_tup_inserted/updated_per_pair, db_wal_bytes_per_pair: pg_stat_database
                       and pg_stat_wal deltas over the run (the bench's own polls subtracted)
  worker_db_statements_per_pair: the workers' own count, from their heartbeat rows
                       (`stats->'db_statements'`, final heartbeat at stop) where the worker
                       reports it; on the scripted path also `worker_sql_per_pair`, statements
                       the worker sent through SQLAlchemy from its first claim to its exit
  db_backends          mean backends in each state over the run, sampled with each poll:
                       `CPU` (active, no wait event), `Lock:...`, `IO:...`, `LWLock:...`, and
                       `idle in transaction` (a worker holding a transaction open)
  vs_baseline          pairs_per_s over the first run of the same path (revise 1 round, the
                       smallest in-flight, 1 worker in the default matrix)

and a table on stderr at the end. Targets (the issue "Generation at GPU scale"): one worker
>= 200 pairs/s, <= 3 ms worker CPU per pair, pairs/s not falling as in-flight grows to 1,024.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES: dict[str, dict[str, Any]] = {
    "revise1": {"mode": "revise", "revisions": 1},
    "revise2": {"mode": "revise", "revisions": 2},
    "ai_feedback": {"mode": "ai_feedback", "n": 4, "scorer": {"kind": "judge", "k": 2}},
}
# ai_feedback asks the engine 28 times a pair (4 answers, 6 comparisons x 2 principles x 2 orders)
# where revise asks 3 or 5: its runs take this share of --prompts.
PROMPT_SHARE = {"ai_feedback": 0.25}
PATHS = ("scripted", "openai")
TARGETS = {"pairs_per_s": 200, "worker_cpu_ms_per_pair": 3.0}


# --- what the instant engines answer (shared by the in-process engine and the stub server) -------


def instant_answer(number: int, last: str) -> str:
    """A short answer, different per request, quoting the start of the last message."""
    return f"Answer {number}: about {' '.join(last.split()[:8])}, a short and careful reply."


def quality(text: str) -> float:
    """A stable score in [0, 1) for an answer: the judge prefers the higher one."""
    return zlib.crc32(text.strip().encode()) / 2**32


def judge_logprobs(question: str) -> tuple[float, float]:
    """Log-probs of `A` and `B` for a judge's question (workers/scoring/judge.py's layout:
    `...Options:\\n(A) first\\n(B) second`), from the two options' `quality`."""
    _, _, options = question.rpartition("\nOptions:\n(A) ")
    a, _, b = options.partition("\n(B) ")
    if (a, b) == ("Yes", "No"):
        # A constitution's no-harm check (trajectory.py): always something to critique, so that
        # every prompt runs the whole loop the ceiling is measured on.
        return math.log(0.9), math.log(0.1)
    p = 1 / (1 + math.exp(-6 * (quality(a) - quality(b))))
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p), math.log(1 - p)


def last_user(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


class InstantEngine:
    """The `Engine` of workers/generation/engines/base.py, answering at once (one event-loop turn,
    as a batching engine's answer arrives in a later turn at the earliest)."""

    on_cpu = False  # nothing to throttle for: as a remote server is, from the worker's side

    def __init__(self, model: str) -> None:
        self.model = model
        self.requests = self.prompt_tokens = self.completion_tokens = 0

    async def start(self) -> None:
        return None

    def _result(self, text: str, messages: list[dict[str, Any]]):
        from workers.generation.engines import ChatResult

        tokens = len(text) // 4
        prompt = 16 * len(messages)  # cheap: the engine's own cost is not what is measured
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += tokens
        return ChatResult(text=text, finish_reason="stop", prompt_tokens=prompt, completion_tokens=tokens)

    async def chat(self, messages, sampling, request_id):
        await asyncio.sleep(0)
        return self._result(instant_answer(self.requests + 1, str(messages[-1]["content"])), messages)

    async def continue_chat(self, messages, assistant_prefix, sampling, request_id):
        await asyncio.sleep(0)
        return self._result(instant_answer(self.requests + 1, assistant_prefix), messages)

    async def option_logprobs(self, messages, assistant_prefix, options, request_id):
        await asyncio.sleep(0)
        self._result("", messages)
        a, b = judge_logprobs(last_user(messages))
        return {options[0]: a, options[1]: b}

    async def refresh_stats(self) -> None:
        return None

    def stats(self):
        from workers.generation.engines import EngineStats

        return EngineStats(
            requests=self.requests, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens
        )

    async def shutdown(self) -> None:
        return None


# --- the scripted path's worker process ---------------------------------------------------------


def run_scripted_worker(stats_file: str) -> int:
    """A generation worker process like `cai-dpo worker generate` (settings from the environment,
    a pool of 4 connections), its engine the `InstantEngine`. Writes what it counted on exit."""
    from sqlalchemy import event

    from cai_dpo.core.db import database_url, get_engine
    from cai_dpo.core.logs import configure_logging
    from cai_dpo.core.settings import get_settings
    from workers.generation.worker import GenerationWorker

    configure_logging("generate")
    settings = get_settings()
    db = get_engine(settings, pool_size=4)
    count = {"statements": 0, "at_first_claim": None}

    @event.listens_for(db, "before_cursor_execute")
    def _counted(*_: Any) -> None:
        count["statements"] += 1

    class BenchWorker(GenerationWorker):
        async def claim(self, *args: Any, **kwargs: Any):  # whatever the worker's signature
            before = count["statements"]
            claimed = await super().claim(*args, **kwargs)
            if claimed and count["at_first_claim"] is None:
                count["at_first_claim"] = before
            return claimed

    async def main() -> BenchWorker:
        worker = BenchWorker(
            settings,
            db,
            url=database_url(settings),
            engine_factory=lambda _s, model, _t: InstantEngine(model),
        )
        worker.install_signal_handlers()
        await worker.run()
        return worker

    worker = asyncio.run(main())
    Path(stats_file).write_text(json.dumps(count | {"pairs_written": worker.pairs_written}))
    return worker.exit_code


# --- the openai path's stub server --------------------------------------------------------------


class StubApp:
    """What `OpenAIEngine` asks of `vllm serve`, answered at once."""

    def __init__(self, model: str, max_model_len: int) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.counts = {"models": 0, "tokenize": 0, "chat": 0, "judge": 0, "metrics": 0, "other": 0}
        self.answers = itertools.count(1)

    def handle(self, method: bytes, url: bytes, body: bytes) -> tuple[bytes, Any]:
        path = url.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and method == b"POST":
            return b"200 OK", self.chat(json.loads(body))
        if path == b"/tokenize" and method == b"POST":
            self.counts["tokenize"] += 1
            messages = json.loads(body).get("messages", [])
            chars = sum(len(str(m.get("content", ""))) for m in messages)
            return b"200 OK", {"count": chars // 4 + 4 * len(messages), "max_model_len": self.max_model_len}
        if path == b"/v1/models":
            self.counts["models"] += 1
            entry = {"id": self.model, "object": "model", "max_model_len": self.max_model_len}
            return b"200 OK", {"object": "list", "data": [entry]}
        if path == b"/metrics":  # vLLM's occupancy gauges: an instant engine holds nothing
            self.counts["metrics"] += 1
            label = f'{{model_name="{self.model}"}}'
            gauges = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
            return b"200 OK", "".join(f"vllm:{name}{label} 0\n" for name in gauges)
        if path == b"/stats":
            return b"200 OK", self.counts
        self.counts["other"] += 1
        return b"404 Not Found", {"error": {"message": f"no route {path.decode(errors='replace')}"}}

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages", [])
        usage = {"prompt_tokens": 16 * len(messages), "completion_tokens": 1}
        if body.get("logprobs"):
            self.counts["judge"] += 1
            a, b = judge_logprobs(last_user(messages))
            entries = [{"token": "A", "logprob": a}, {"token": "B", "logprob": b}]
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "A" if a >= b else "B"},
                "logprobs": {"content": [{**entries[0 if a >= b else 1], "top_logprobs": entries}]},
                "finish_reason": "length",
            }
        else:
            self.counts["chat"] += 1
            text = instant_answer(
                next(self.answers), str(messages[-1].get("content", "")) if messages else ""
            )
            usage["completion_tokens"] = len(text) // 4
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        return {"object": "chat.completion", "model": self.model, "choices": [choice], "usage": usage}


def run_stub_server(port: int, model: str, max_model_len: int) -> None:
    """HTTP/1.1 keep-alive on loopback: an asyncio protocol with httptools' parser, each request
    answered inside the callback that completes it (no task, no framework)."""
    import httptools

    try:
        import uvloop
    except ImportError:  # the stdlib loop: slower, still correct
        uvloop = None

    app = StubApp(model, max_model_len)

    class Connection(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.body: list[bytes] = []
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.write(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                self.transport.close()

        def on_message_begin(self) -> None:
            self.url, self.body = b"", []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            try:
                status, payload = app.handle(self.parser.get_method(), self.url, b"".join(self.body))
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the server
                status, payload = b"400 Bad Request", {"error": {"message": f"{type(exc).__name__}: {exc}"}}
            if isinstance(payload, str):
                data, kind = payload.encode(), b"text/plain; version=0.0.4"
            else:
                data, kind = json.dumps(payload, separators=(",", ":")).encode(), b"application/json"
            keep = self.parser.should_keep_alive()
            head = b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
                status,
                kind,
                len(data),
                b"" if keep else b"connection: close\r\n",
            )
            self.transport.write(head + data)
            if not keep:
                self.transport.close()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Connection, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"stub ready on {port}", file=sys.stderr, flush=True)
        async with server:
            await stop.wait()

    if uvloop is not None:
        uvloop.run(serve())
    else:
        asyncio.run(serve())


# --- measuring ----------------------------------------------------------------------------------


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of the process (all its threads); with `children`, also its live children's
    and the children it has reaped (cutime + cstime). 0 for a process that is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        times = process.cpu_times()
        total = times.user + times.system
        if children:
            total += times.children_user + times.children_system
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
        return total
    except psutil.Error:
        return 0.0


@dataclass
class Config:
    path: str
    mode: str
    in_flight: int
    workers: int
    prompts: int

    @property
    def label(self) -> str:
        return f"{self.path} {self.mode} in-flight {self.in_flight} x{self.workers}"


@dataclass
class Bench:
    args: argparse.Namespace
    url: str
    api_pid: int
    db_url: str
    data_dir: str
    stub_pid: int | None = None
    stub_url: str | None = None
    conn: Any = None
    postmaster: int = 0
    bench_xacts: int = 0
    baselines: dict[str, float] = field(default_factory=dict)

    def connect(self) -> None:
        import psycopg

        from cai_dpo.core.db import libpq_url

        self.conn = psycopg.connect(libpq_url(self.db_url), autocommit=True)
        import psutil

        self.postmaster = psutil.Process(self.query("SELECT pg_backend_pid()")[0][0]).ppid()

    def query(self, sql: str, params: Any = None) -> list[tuple]:
        """One statement in its own transaction (counted: subtracted from the database's)."""
        self.bench_xacts += 1
        return self.conn.execute(sql, params).fetchall()

    def db_counters(self) -> dict[str, float]:
        (row,) = self.query(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched "
            "FROM pg_stat_database WHERE datname = current_database()"
        )
        counters = dict(
            zip(("xact", "rollback", "inserted", "updated", "deleted", "fetched"), row, strict=True)
        )
        with contextlib.suppress(Exception):  # pg_stat_wal: PostgreSQL 14+
            counters["wal_bytes"] = float(self.query("SELECT wal_bytes FROM pg_stat_wal")[0][0])
        return counters

    def cpu(self, worker_pids: list[int]) -> dict[str, float]:
        return {
            "worker": sum(cpu_seconds(pid) for pid in worker_pids),
            "api": cpu_seconds(self.api_pid, children=True),
            "db": cpu_seconds(self.postmaster, children=True),
            "stub": cpu_seconds(self.stub_pid) if self.stub_pid else 0.0,
        }

    def heartbeats(self, pids: list[int], since: float) -> dict[int, dict[str, Any]]:
        rows = self.query(
            "SELECT pid, stats, stopped_at IS NOT NULL FROM workers "
            "WHERE kind = 'generate' AND pid = ANY(%s) AND heartbeat_at >= to_timestamp(%s)",
            (pids, since),
        )
        return {pid: (stats or {}) | {"_stopped": stopped} for pid, stats, stopped in rows}

    def stub_counts(self) -> dict[str, int]:
        import httpx

        if not self.stub_url:
            return {}
        return httpx.get(self.stub_url.removesuffix("/v1") + "/stats", timeout=10).json()

    # --- one run --------------------------------------------------------------------------

    def start_workers(self, config: Config, stats_dir: Path) -> list[tuple[subprocess.Popen, Path | None]]:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {
            "DATABASE_URL": self.db_url,
            "CAI_DATA_DIR": self.data_dir,
            "CAI_MAX_IN_FLIGHT": str(config.in_flight),
            "CAI_LOG_LEVEL": self.args.worker_log_level,
        }
        if config.path == "openai":
            env |= {"CAI_ENGINE": "openai", "CAI_OPENAI_BASE_URL": self.stub_url}
        env |= dict(item.split("=", 1) for item in self.args.worker_env)
        started = []
        for i in range(config.workers):
            if config.path == "scripted":
                stats_file = stats_dir / f"worker-{i}.json"
                argv = [sys.executable, __file__, "--worker-process", "--stats-file", str(stats_file)]
            else:
                stats_file = None
                argv = [sys.executable, "-m", "cai_dpo.cli.main", "worker", "generate"]
            # DATABASE_URL set: `cai-dpo worker generate` execs the worker, so the pid is the worker's.
            started.append((subprocess.Popen(argv, env=env, cwd=ROOT, stdout=sys.stderr), stats_file))
        return started

    def wait_ready(self, procs: list[subprocess.Popen], since: float) -> dict[int, dict[str, Any]]:
        """Until every worker has written its first heartbeat (its engine started)."""
        deadline = time.monotonic() + 120
        pids = [p.pid for p in procs]
        while True:
            beats = self.heartbeats(pids, since)
            if len(beats) == len(pids):
                return beats
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {proc.pid} exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("the workers were not ready within 120 s")
            time.sleep(0.1)

    def run(self, config: Config) -> dict[str, Any]:
        import httpx

        since = time.time() - 1
        with tempfile.TemporaryDirectory(prefix="cai-ceiling-") as tmp:
            started = self.start_workers(config, Path(tmp))
            procs = [proc for proc, _ in started]
            pids = [proc.pid for proc in procs]
            try:
                beats_before = self.wait_ready(procs, since)
                time.sleep(self.args.settle)
                prompts = [
                    f"Prompt {i} of run {time.time_ns() % 10**6}: how would you answer a question about "
                    f"topic {i % 97}, and what should an assistant never say about it?"
                    for i in range(config.prompts)
                ]
                body = {"prompts": prompts, "constitution": self.args.constitution} | MODES[config.mode]
                body["sampling"] = {"max_tokens": 64}
                xacts_before = self.bench_xacts
                db_before = self.db_counters()
                stub_before = self.stub_counts()
                cpu_before = self.cpu(pids)
                submitted = time.time()
                wall_started = time.perf_counter()
                response = httpx.post(f"{self.url}/generate", json=body, timeout=120)
                if response.status_code != 202:
                    raise RuntimeError(f"POST /generate: {response.status_code} {response.text[:500]}")
                job_id = response.json()["job_id"]
                waits, samples = self.wait_done(job_id, procs, config)
                wall = time.perf_counter() - wall_started
                cpu_after = self.cpu(pids)
                stub_after = self.stub_counts()
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                for proc in procs:
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            time.sleep(1.0)  # the workers' backends flush their statistics as they exit
            with contextlib.suppress(Exception):  # PostgreSQL 15+: this session's own figures too
                self.query("SELECT pg_stat_force_next_flush()")
            bench_xacts = self.bench_xacts - xacts_before
            db_after = self.db_counters()
            beats_after = self.heartbeats(pids, since)
            own = [json.loads(f.read_text()) for _, f in started if f is not None and f.exists()]
        return self.figures(
            config,
            job_id=job_id,
            submitted=submitted,
            wall=wall,
            cpu=(cpu_before, cpu_after),
            db=(db_before, db_after, bench_xacts),
            beats=(beats_before, beats_after),
            stub=(stub_before, stub_after),
            own=own,
            waits=(waits, samples),
            exit_codes=[proc.returncode for proc in procs],
        )

    def wait_done(
        self, job_id: int, procs: list[subprocess.Popen], config: Config
    ) -> tuple[dict[str, float], int]:
        """Poll until no prompt of the job is queued or running; sample the backends' states."""
        sql = """
            SELECT (SELECT count(*) FROM prompts WHERE job_id = %(job)s AND status IN ('queued', 'running')),
                   (SELECT coalesce(json_object_agg(state, n), '{}') FROM (
                        SELECT CASE WHEN a.state = 'active' THEN
                                    coalesce(a.wait_event_type || ':' || a.wait_event, 'CPU')
                               ELSE a.state END AS state, count(*) AS n
                        FROM pg_stat_activity a
                        WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
                          AND a.datname = current_database() AND a.state <> 'idle'
                        GROUP BY 1) s)
        """
        deadline = time.monotonic() + self.args.run_timeout
        waits: dict[str, float] = {}
        samples = 0
        while True:
            ((pending, states),) = self.query(sql, {"job": job_id})
            samples += 1
            for state, n in states.items():
                waits[state] = waits.get(state, 0) + n
            if pending == 0:
                return waits, samples
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{config.label}: worker {proc.pid} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{config.label}: {pending} prompts left after {self.args.run_timeout} s")
            time.sleep(self.args.poll)

    def figures(self, config: Config, **m: Any) -> dict[str, Any]:
        # finished_at is its transaction's start: prompts committed together share one, so the
        # distinct values count the commits that finished prompts.
        (
            (
                n,
                done,
                failed,
                retried,
                first_started,
                last_finished,
                commits,
                p10,
                p90,
                middle,
                middle_commits,
            ),
        ) = self.query(
            """WITH p AS (SELECT status, attempts, started_at, finished_at,
                                     extract(epoch FROM finished_at)::float8 AS f
                              FROM prompts WHERE job_id = %s),
                        q AS (SELECT percentile_disc(0.1) WITHIN GROUP (ORDER BY f) AS p10,
                                     percentile_disc(0.9) WITHIN GROUP (ORDER BY f) AS p90 FROM p)
                   SELECT count(*), count(*) FILTER (WHERE status = 'done'),
                          count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE attempts > 1),
                          extract(epoch FROM min(started_at))::float8, max(f), count(DISTINCT f),
                          q.p10, q.p90,
                          count(*) FILTER (WHERE f > q.p10 AND f <= q.p90),
                          count(DISTINCT f) FILTER (WHERE f > q.p10 AND f <= q.p90)
                   FROM p, q GROUP BY q.p10, q.p90""",
            (m["job_id"],),
        )
        ((pairs, paired_prompts),) = self.query(
            "SELECT count(*), count(DISTINCT prompt_id) FROM pairs WHERE job_id = %s", (m["job_id"],)
        )
        seconds = max((last_finished or time.time()) - m["submitted"], 1e-6)
        # Prompts finished in each tenth of the run (from submission): a falling rate shows here.
        tenths = dict(
            self.query(
                """SELECT least(floor((extract(epoch FROM finished_at)::float8 - %(t0)s) / %(dt)s), 9)::int,
                          count(*)
                   FROM prompts WHERE job_id = %(job)s AND finished_at IS NOT NULL GROUP BY 1""",
                {"t0": m["submitted"], "dt": seconds / 10, "job": m["job_id"]},
            )
        )
        wall = m["wall"]
        per_pair = max(pairs, 1)
        cpu_before, cpu_after = m["cpu"]
        cpu = {k: max(cpu_after[k] - cpu_before[k], 0.0) for k in cpu_before}
        db_before, db_after, bench_xacts = m["db"]
        db = {k: db_after[k] - db_before[k] for k in db_before if k in db_after}
        pairs_per_s = pairs / seconds
        baseline = self.baselines.setdefault(config.path, pairs_per_s)
        out: dict[str, Any] = {
            "bench": "ceiling",
            "path": config.path,
            "mode": config.mode,
            "in_flight": config.in_flight,
            "workers": config.workers,
            "prompts": n,
            "done": done,
            "failed": failed,
            "retried": retried,
            "pairs": pairs,
            "all_done_one_pair": n == config.prompts == done == pairs == paired_prompts,
            "seconds": round(seconds, 3),
            "pairs_per_s": round(pairs_per_s, 1),
            # Over fewer than 4 commits the middle of the run is too coarse to time.
            "steady_pairs_per_s": round(middle / (p90 - p10), 1) if middle_commits >= 4 else None,
            "pairs_per_commit": round(n / max(commits, 1), 1),
            "finished_by_tenth": [tenths.get(i, 0) for i in range(10)],
            "start_latency_s": round(first_started - m["submitted"], 3) if first_started else None,
            "vs_baseline": round(pairs_per_s / baseline, 3),
            "worker_cpu_ms_per_pair": round(1000 * cpu["worker"] / per_pair, 3),
            "worker_cpu_util": round(cpu["worker"] / wall, 3),
            "api_cpu_ms_per_pair": round(1000 * cpu["api"] / per_pair, 3),
            "db_cpu_ms_per_pair": round(1000 * cpu["db"] / per_pair, 3),
            "db_cpu_util": round(cpu["db"] / wall, 3),
        }
        if config.path == "openai":
            out["stub_cpu_ms_per_pair"] = round(1000 * cpu["stub"] / per_pair, 3)
            out["stub_cpu_util"] = round(cpu["stub"] / wall, 3)
            before, after = m["stub"]
            http = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            out["stub_requests_per_pair"] = {k: round(v / per_pair, 2) for k, v in http.items() if v}
        out["cpu_util_total"] = round(sum(cpu.values()) / wall, 3)
        out |= {
            "db_xact_per_pair": round((db["xact"] - bench_xacts) / per_pair, 2),
            "db_rollback_per_pair": round(db["rollback"] / per_pair, 3),
            "db_tup_inserted_per_pair": round(db["inserted"] / per_pair, 2),
            "db_tup_updated_per_pair": round(db["updated"] / per_pair, 2),
            "db_tup_fetched_per_pair": round(db["fetched"] / per_pair, 1),
        }
        if "wal_bytes" in db:
            out["db_wal_bytes_per_pair"] = round(db["wal_bytes"] / per_pair)
        out |= self.worker_counters(m["beats"], per_pair)
        if m["own"]:
            sql = sum(
                o["statements"] - (o["at_first_claim"] or 0)
                for o in m["own"]
                if o["at_first_claim"] is not None
            )
            written = sum(o["pairs_written"] for o in m["own"])
            out["worker_sql_per_pair"] = round(sql / max(written, 1), 2)
        waits, samples = m["waits"]
        out["db_backends"] = {
            k: round(v / samples, 2)
            for k, v in sorted(waits.items(), key=lambda kv: -kv[1])
            if v / samples >= 0.01
        }
        out["worker_exit_codes"] = m["exit_codes"]
        out["settings"] = {"CAI_MAX_IN_FLIGHT": config.in_flight} | dict(
            item.split("=", 1) for item in self.args.worker_env
        )
        out["cores"] = os.cpu_count()
        out["targets"] = TARGETS
        return out

    @staticmethod
    def worker_counters(beats: tuple[dict, dict], per_pair: int) -> dict[str, Any]:
        """From the heartbeat rows: the first (engine ready) against the last (written at stop)."""
        before, after = beats
        out: dict[str, Any] = {}
        stopped = [after.get(pid, {}).get("_stopped", False) for pid in before]
        out["workers_marked_stopped"] = all(stopped) if stopped else None

        def delta(key: str) -> float | None:
            if not all(isinstance(after.get(pid, {}).get(key), int | float) for pid in before):
                return None
            return sum(after[pid][key] - (before[pid].get(key) or 0) for pid in before)

        if (statements := delta("db_statements")) is not None:
            out["worker_db_statements_per_pair"] = round(statements / per_pair, 2)
        if (cpu := delta("cpu_seconds")) is not None:
            out["worker_reported_cpu_ms_per_pair"] = round(1000 * cpu / per_pair, 3)
        if (requests := delta("requests")) is not None:
            out["engine_requests_per_pair"] = round(requests / per_pair, 2)
        if (written := delta("pairs_written")) is not None:
            out["worker_pairs_written"] = int(written)
        if targets := [
            after[pid]["in_flight_target"] for pid in before if "in_flight_target" in after.get(pid, {})
        ]:
            out["worker_in_flight_targets"] = targets
        return out


# --- the plan -----------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(choices: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if bad := [x for x in items if x not in choices]:
            raise argparse.ArgumentTypeError(f"{bad}: choose from {', '.join(choices)}")
        return items

    return parse


def plan(args: argparse.Namespace) -> list[Config]:
    """The runs: the full product with --full, else an in-flight sweep of the first mode on each
    path (1 worker), every other mode at --base-in-flight (1 worker) on each path, and the worker
    counts at --base-in-flight with the first mode on the first path."""

    def sized(path: str, mode: str, in_flight: int, workers: int) -> Config:
        share = round(args.prompts * PROMPT_SHARE.get(mode, 1.0))
        prompts = max(share, args.waves * in_flight * workers)
        return Config(path, mode, in_flight, workers, prompts)

    if args.dry_run:
        return [
            Config("scripted", "revise1", 8, 1, args.dry_run_prompts),
            Config("openai", "ai_feedback", 8, 1, args.dry_run_prompts),
        ]
    if args.full:
        product = itertools.product(args.paths, args.modes, args.in_flight, args.workers)
        return [sized(*combo) for combo in product]
    runs: list[Config] = []
    first = args.modes[0]
    for path in args.paths:
        runs += [sized(path, first, f, 1) for f in args.in_flight]
        runs += [sized(path, mode, args.base_in_flight, 1) for mode in args.modes[1:]]
    runs += [sized(args.paths[0], first, args.base_in_flight, w) for w in args.workers if w != 1]
    unique: dict[tuple, Config] = {}
    for run in runs:
        unique.setdefault((run.path, run.mode, run.in_flight, run.workers), run)
    return list(unique.values())


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'path':9} {'mode':12} {'in-fl':>5} {'wk':>2} {'pairs':>6} {'pairs/s':>8} {'steady':>8} "
        f"{'wkr ms/p':>8} {'db ms/p':>8} {'stub ms/p':>9} {'xact/p':>6} {'stmt/p':>6} "
        f"{'wkr util':>8} {'db util':>7} {'all':>5}  top db backends"
    )
    lines = [head]
    for r in results:
        statements = r.get("worker_db_statements_per_pair", r.get("worker_sql_per_pair"))
        backends = ", ".join(f"{k} {v}" for k, v in list(r["db_backends"].items())[:3])
        steady = "-" if r["steady_pairs_per_s"] is None else f"{r['steady_pairs_per_s']:.1f}"
        lines.append(
            f"{r['path']:9} {r['mode']:12} {r['in_flight']:5} {r['workers']:2} {r['pairs']:6} "
            f"{r['pairs_per_s']:8.1f} {steady:>8} {r['worker_cpu_ms_per_pair']:8.2f} "
            f"{r['db_cpu_ms_per_pair']:8.2f} {r.get('stub_cpu_ms_per_pair', 0):9.2f} "
            f"{r['db_xact_per_pair']:6.1f} {statements if statements is not None else '-':>6} "
            f"{r['worker_cpu_util']:8.2f} {r['db_cpu_util']:7.2f} {r['cpu_util_total']:5.2f}  {backends}"
        )
    return "\n".join(lines)


def start_stub(model: str) -> tuple[subprocess.Popen, str]:
    from service import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--stub-server", str(port), "--model", model], cwd=ROOT, stdout=sys.stderr
    )
    import httpx

    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the stub server did not start")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paths", type=str_list(PATHS), default=list(PATHS), help="scripted,openai")
    parser.add_argument(
        "--in-flight", type=int_list, default=[64, 256, 1024], help="CAI_MAX_IN_FLIGHT values"
    )
    parser.add_argument(
        "--modes",
        type=str_list(list(MODES)),
        default=list(MODES),
        help=f"{','.join(MODES)} (the first is swept)",
    )
    parser.add_argument("--workers", type=int_list, default=[1, 2, 4], help="worker processes per run")
    parser.add_argument(
        "--base-in-flight", type=int, default=256, help="in-flight of the mode and worker runs"
    )
    parser.add_argument("--full", action="store_true", help="every path x mode x in-flight x workers")
    parser.add_argument(
        "--prompts",
        type=int,
        default=2000,
        help="prompts per run (ai_feedback: a quarter), at least --waves x in-flight x workers",
    )
    parser.add_argument("--waves", type=int, default=2, help="prompts per run >= waves x in-flight x workers")
    parser.add_argument("--dry-run", "--quick", action="store_true", help="one tiny run of each path")
    parser.add_argument("--dry-run-prompts", type=int, default=24, help=argparse.SUPPRESS)
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between reads of the job's state")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds between ready and submission")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker setting, e.g. CAI_CLAIM_BATCH=64 or CAI_OPENAI_CONCURRENCY=128 (repeatable)",
    )
    parser.add_argument("--worker-log-level", default="WARNING")
    parser.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", help=argparse.SUPPRESS)
    parser.add_argument("--stub-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--max-model-len", type=int, default=2048, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_process:
        sys.exit(run_scripted_worker(args.stats_file))
    if args.stub_server:
        run_stub_server(args.stub_server, args.model, args.max_model_len)
        return
    if bad := [item for item in args.worker_env if "=" not in item]:
        parser.error(f"--worker-env takes KEY=VALUE, not {bad}")

    from service import running_service

    from cai_dpo.core.settings import Settings

    runs = plan(args)
    model = Settings().model
    print(f"ceiling: {len(runs)} runs: " + "; ".join(r.label for r in runs), file=sys.stderr, flush=True)
    results = []
    started = time.perf_counter()
    stub = None
    with (
        tempfile.TemporaryDirectory(prefix="cai-ceiling-data-") as data_dir,
        running_service(env={"CAI_LOG_LEVEL": "WARNING"}) as (url, api, db_url),
    ):
        bench = Bench(args, url, api.pid, db_url, data_dir)
        bench.connect()
        try:
            if any(r.path == "openai" for r in runs):
                stub, bench.stub_url = start_stub(model)
                bench.stub_pid = stub.pid
            for config in runs:
                print(f"ceiling: {config.label}, {config.prompts} prompts", file=sys.stderr, flush=True)
                result = bench.run(config)
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            if stub is not None:
                stub.terminate()
                stub.wait(timeout=30)
            bench.conn.close()
    print("\n" + table(results), file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "ceiling",
                "runs": len(results),
                "seconds": round(time.perf_counter() - started, 1),
                "all_done_one_pair": all(r["all_done_one_pair"] for r in results),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
