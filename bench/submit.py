"""How long `POST /generate` takes to accept 10,000 prompts (target: under 2 s on the dev machine).

    python bench/submit.py [--prompts 10000] [--repeat 5]

Runs a real `cai-dpo serve` on an embedded PostgreSQL and times whole HTTP requests, from the
first byte sent to the 202 with the job id (validation, constitution version, COPY of the rows).
"""

import argparse
import json
import statistics
import time

import httpx
from service import running_service


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    prompts = [
        f"Prompt number {i}: how would you answer a question about topic {i % 97}?"
        for i in range(args.prompts)
    ]
    times = []
    with running_service() as (url, _, _), httpx.Client(base_url=url, timeout=120) as http:
        http.post("/generate", json={"prompts": prompts[:10], "constitution": "harmless"})  # warm up
        for _ in range(args.repeat):
            started = time.perf_counter()
            response = http.post("/generate", json={"prompts": prompts, "constitution": "harmless"})
            times.append(time.perf_counter() - started)
            assert response.status_code == 202 and response.json()["n_prompts"] == args.prompts, response.text
    print(
        json.dumps(
            {
                "bench": "submit",
                "prompts": args.prompts,
                "seconds_median": round(statistics.median(times), 3),
                "seconds_max": round(max(times), 3),
                "runs": [round(t, 3) for t in times],
                "target_s": 2.0,
            }
        )
    )


if __name__ == "__main__":
    main()
