"""Load: concurrent clients submitting, polling, paging and exporting against `cai-dpo up`.

    python bench/load.py [--minutes 10] [--clients 50] [--pairs 10000] [--url http://...]

Starts `cai-dpo up` (embedded PostgreSQL, the API, one generation worker on the bundled model)
with `--pairs` stored pairs, unless `--url` names a running service. Each of `--clients` asyncio
clients repeats: `POST /generate` (2 HH-RLHF prompts, revisions 1, 16 tokens), `GET /jobs/{id}` 5
times a second apart, two pages of `GET /pairs` (50 rows, the second by `next_cursor`), and one
time in ten `GET /export` (JSONL, read to the end). Prints one JSON line: p50/p99/max latency
(ms), errors (a transport error or any status but 2xx and 429) and 429 refusals (the export pool
full, with Retry-After) per route, requests, jobs submitted and
prompts the worker finished meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections import defaultdict

import httpx
from generation import HH_PATH, hh_prompts
from service import insert_bench_pairs, running_service
from sqlalchemy import create_engine, text

from cai_dpo.core.db import sqlalchemy_url


class Recorder:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.refused: dict[str, int] = defaultdict(int)

    async def call(self, route: str, request) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = await request()
        except httpx.HTTPError as exc:
            self.errors[route][type(exc).__name__] += 1
            return None
        finally:
            self.latencies[route].append(time.perf_counter() - started)
        if response.status_code == 429:  # the export pool full: a refusal to retry, not a failure
            self.refused[route] += 1
        elif not response.is_success:
            self.errors[route][str(response.status_code)] += 1
        return response

    def summary(self) -> dict[str, dict]:
        out = {}
        for route, times in sorted(self.latencies.items()):
            times = sorted(times)
            out[route] = {
                "n": len(times),
                "p50_ms": round(times[len(times) // 2] * 1000, 1),
                "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 1),
                "max_ms": round(times[-1] * 1000, 1),
                "errors": dict(self.errors[route]),
                "refused_429": self.refused[route],
            }
        return out


async def client(
    http: httpx.AsyncClient, rec: Recorder, prompts: list[str], deadline: float, jobs: list
) -> None:
    rng = random.Random(id(rec) ^ len(jobs))
    while time.monotonic() < deadline:
        body = {
            "prompts": rng.sample(prompts, 2),
            "constitution": "harmless",
            "revisions": 1,
            "sampling": {"max_tokens": 16},
        }
        response = await rec.call("POST /generate", lambda: http.post("/generate", json=body))  # noqa: B023
        job_id = response.json()["job_id"] if response is not None and response.is_success else None
        if job_id is not None:
            jobs.append(job_id)
            for _ in range(5):
                await rec.call("GET /jobs/{id}", lambda: http.get(f"/jobs/{job_id}"))  # noqa: B023
                await asyncio.sleep(1)
        page = await rec.call("GET /pairs", lambda: http.get("/pairs", params={"limit": 50}))
        cursor = page.json().get("next_cursor") if page is not None and page.is_success else None
        if cursor:
            await rec.call("GET /pairs", lambda: http.get("/pairs", params={"limit": 50, "cursor": cursor}))  # noqa: B023
        if rng.random() < 0.1:
            await rec.call("GET /export", lambda: read_all(http, "/export?format=jsonl"))
        await asyncio.sleep(rng.uniform(0.5, 1.5))


async def read_all(http: httpx.AsyncClient, path: str) -> httpx.Response:
    async with http.stream("GET", path) as response:
        async for _ in response.aiter_bytes():
            pass
        return response


async def run(url: str, args: argparse.Namespace) -> dict:
    rec = Recorder()
    prompts = hh_prompts(HH_PATH, 200)
    jobs: list[int] = []
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.monotonic()
        deadline = started + args.minutes * 60
        await asyncio.gather(*(client(http, rec, prompts, deadline, jobs) for _ in range(args.clients)))
        elapsed = time.monotonic() - started
    requests = sum(len(v) for v in rec.latencies.values())
    errors = sum(sum(v.values()) for v in rec.errors.values())
    return {
        "bench": "load",
        "clients": args.clients,
        "minutes": round(elapsed / 60, 2),
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 1),
        "errors": errors,
        "refused_429": sum(rec.refused.values()),
        "jobs_submitted": len(jobs),
        "routes": rec.summary(),
    }


def prompts_done(db_url: str) -> dict[str, int]:
    db = create_engine(sqlalchemy_url(db_url))
    with db.connect() as conn:
        counts = dict(conn.execute(text("SELECT status, count(*) FROM prompts GROUP BY status")).all())
    db.dispose()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=10_000, help="pairs stored before the run")
    parser.add_argument("--url", help="a running service (else `cai-dpo up` is started)")
    args = parser.parse_args()
    if args.url:
        print(json.dumps(asyncio.run(run(args.url, args))))
        return
    env = {"CAI_LOG_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with running_service(workers=True, env=env, timeout=600) as (url, _, db_url):
        insert_bench_pairs(db_url, args.pairs)
        result = asyncio.run(run(url, args))
        with contextlib.suppress(Exception):
            result["prompts_by_status_at_end"] = prompts_done(db_url)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
