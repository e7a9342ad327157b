"""The database under load: hot-path latency with 10 million prompt rows and 1 million pairs.

    python bench/scale.py [--jobs 1000] [--prompts-per-job 10000] [--pairs 1000000]

Fills a fresh embedded PostgreSQL with `jobs x prompts-per-job` prompt rows (most done, the
newest jobs queued, a few failed) and `--pairs` pairs, all in SQL (generate_series), then times:
the claim of 16 prompts as a worker does it (and the renewal of their leases), and over HTTP
against a real `cai-dpo serve`: `/metrics`, `/jobs/{id}`, one `/pairs` page deep in the table,
and `/health`, after a VACUUM (as autovacuum leaves the tables; `/metrics` is also timed before
it). Prints p50/p99 of each (target: every p99 under 50 ms) as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import httpx
from service import running_service

from cai_dpo.core import queue
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.settings import Settings

FILL = [
    """INSERT INTO constitution_versions (name, content_hash, body, spec)
       VALUES ('harmless', repeat('a', 64), 'principles: []', '{}')""",
    """INSERT INTO generation_jobs (constitution_version_id, constitution_name, model, revisions, sampling,
                                    n_prompts, options)
       SELECT 1, 'harmless', 'smollm2-135m-instruct', 1, '{"temperature": 0.7, "top_p": 0.95,
              "max_tokens": 64, "seed": null}', :per_job, '{}'
       FROM generate_series(1, :jobs)""",
    # The newest 1% of the jobs are still queued; 0.1% of the rest failed; the rest are done.
    """INSERT INTO prompts (job_id, position, messages, status, attempts, started_at, finished_at)
       SELECT j, p, jsonb_build_array(jsonb_build_object('role', 'user', 'content',
                 'Prompt ' || j || '-' || p || ': how would you answer a question on topic ' || (p % 97))),
              CASE WHEN j > :jobs * 0.99 THEN 'queued' WHEN p % 1000 = 7 THEN 'failed' ELSE 'done' END,
              CASE WHEN j > :jobs * 0.99 THEN 0 ELSE 1 END,
              CASE WHEN j > :jobs * 0.99 THEN NULL ELSE now() END,
              CASE WHEN j > :jobs * 0.99 THEN NULL ELSE now() END
       FROM generate_series(1, :jobs) j, generate_series(0, :per_job - 1) p""",
    # One pair for each of the first done prompts, about 1.2 KB of text like a real pair.
    """INSERT INTO pairs (prompt_id, job_id, source, constitution_name, constitution_version_id, prompt,
                          chosen, rejected, trajectory, flags, model)
       SELECT id, job_id, 'generated', 'harmless', 1, messages,
              repeat('A revised, careful answer. ', 24), repeat('A first, careless answer. ', 24),
              '{"principles": ["harm"]}', CASE WHEN id % 10 = 0 THEN '{truncated}'::text[] ELSE '{}' END,
              'smollm2-135m-instruct'
       FROM prompts WHERE status = 'done' ORDER BY id LIMIT :pairs""",
    "ANALYZE",
]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "n": len(ordered),
    }


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm up (connections, plans)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--prompts-per-job", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    with running_service() as (url, _, db_url):
        from sqlalchemy import text

        from cai_dpo.core.db import get_engine

        settings = Settings(database_url=db_url)
        engine = get_engine(settings, pool_size=2)
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text("SET statement_timeout = 0"))
            for statement in FILL:
                conn.execute(
                    text(statement), {"jobs": args.jobs, "per_job": args.prompts_per_job, "pairs": args.pairs}
                )
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT (SELECT count(*) FROM prompts), (SELECT count(*) FROM pairs)")
            ).one()
        print(json.dumps({"bench": "scale", "fill_s": round(time.perf_counter() - started, 1),
                          "prompts": rows[0], "pairs": rows[1]}), flush=True)  # fmt: skip

        results = {}
        held: list[int] = []

        # Right after a bulk load the visibility map is unset, so the index-only counts behind
        # /metrics read the heap row by row; autovacuum sets it (PostgreSQL 13+ vacuums after
        # inserts too). Timed once like that, then everything after a VACUUM: the steady state.
        with httpx.Client(base_url=url, timeout=60) as http:
            results["GET /metrics (before the first VACUUM)"] = percentiles(
                timed(lambda: http.get("/metrics").raise_for_status(), 20)
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SET statement_timeout = 0"))
            vacuum_started = time.perf_counter()
            conn.execute(text("VACUUM ANALYZE"))
        print(
            json.dumps({"bench": "scale", "vacuum_s": round(time.perf_counter() - vacuum_started, 1)}),
            flush=True,
        )

        def claim() -> None:
            with session_scope(engine) as session:
                claimed = job_queries.claim_prompts(
                    session,
                    worker_id="bench",
                    model="smollm2-135m-instruct",
                    n=16,
                    lease_seconds=60,
                    max_attempts=3,
                )
                held.extend(p.id for p in claimed)

        def renew() -> None:
            with session_scope(engine) as session:
                queue.renew(session, queue.PROMPTS, worker_id="bench", ids=held[-64:], lease_seconds=60)

        results["claim 16 prompts"] = percentiles(timed(claim, args.repeat))
        results["renew 64 leases"] = percentiles(timed(renew, args.repeat))
        middle_job = args.jobs // 2
        deep_cursor = args.pairs // 2
        with httpx.Client(base_url=url, timeout=60) as http:
            for name, path in [
                ("GET /metrics", "/metrics"),
                (f"GET /jobs/{middle_job}", f"/jobs/{middle_job}"),
                ("GET /pairs (a page deep in the table)", f"/pairs?limit=50&cursor={deep_cursor}"),
                ("GET /pairs?constitution=harmless", "/pairs?limit=50&constitution=harmless"),
                ("GET /health", "/health"),
            ]:

                def get(path: str = path) -> None:
                    response = http.get(path)
                    assert response.status_code == 200, (path, response.status_code, response.text[:300])

                results[name] = percentiles(timed(get, args.repeat))
        for name, figures in results.items():
            print(
                json.dumps({"bench": "scale", "operation": name, **figures, "target_p99_ms": 50}), flush=True
            )
        print(f"\n{'operation':45} {'p50 ms':>8} {'p99 ms':>8}")
        for name, figures in results.items():
            print(f"{name:45} {figures['p50_ms']:8.2f} {figures['p99_ms']:8.2f}")


if __name__ == "__main__":
    main()
