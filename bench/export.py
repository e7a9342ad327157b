"""Memory of the API process while it streams a large export (target: < 100 MB growth for 100,000 pairs).

    python bench/export.py [--pairs 100000]

Writes the pairs straight into the database (COPY), then downloads `/export` as JSONL and as
Parquet from a real `cai-dpo serve`, sampling the server's RSS every 20 ms.
"""

import argparse
import json
import threading
import time

import httpx
import psutil
import psycopg
from psycopg.types.json import Jsonb
from service import running_service


def fill(db_url: str, n: int) -> None:
    answer = "A considered answer that explains the safe alternative in a few sentences. " * 6
    with (
        psycopg.connect(db_url) as conn,
        conn.cursor() as cur,
        cur.copy(
            "COPY pairs (source, constitution_name, prompt, chosen, rejected, trajectory) FROM STDIN"
        ) as copy,
    ):
        for i in range(n):
            prompt = Jsonb(
                [
                    {
                        "role": "user",
                        "content": f"Question {i}: how do I stay safe doing activity {i % 1000}?",
                    }
                ]
            )
            copy.write_row(
                (
                    "bench",
                    "harmless",
                    prompt,
                    answer + str(i),
                    "A careless answer. " * 20,
                    Jsonb({"principles": ["harm"]}),
                )
            )


def peak_rss_during(pid: int, action) -> tuple[int, int, object]:
    process = psutil.Process(pid)
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join()
    return baseline, peak, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=100_000)
    args = parser.parse_args()
    with running_service() as (url, proc, db_url), httpx.Client(base_url=url, timeout=600) as http:
        fill(db_url, args.pairs)
        http.get("/export", params={"job_id": 0})  # warm up the route
        for fmt in ("jsonl", "parquet"):

            def download(fmt=fmt):
                size, started = 0, time.perf_counter()
                with http.stream("GET", "/export", params={"format": fmt, "metadata": True}) as response:
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                return size, time.perf_counter() - started

            baseline, peak, (size, seconds) = peak_rss_during(proc.pid, download)
            print(
                json.dumps(
                    {
                        "bench": "export",
                        "format": fmt,
                        "pairs": args.pairs,
                        "bytes": size,
                        "seconds": round(seconds, 2),
                        "rss_before_mb": round(baseline / 2**20, 1),
                        "rss_peak_mb": round(peak / 2**20, 1),
                        "growth_mb": round((peak - baseline) / 2**20, 1),
                        "target_growth_mb": 100,
                    }
                )
            )


if __name__ == "__main__":
    main()
