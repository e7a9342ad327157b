"""What `sampling.seed` repeats: the same job run three times, each on a fresh service.

    python bench/seeds.py [--prompts 12] [--max-tokens 32] [--seed 3]

A request's seed is derived from the job's seed, the prompt's id and the stage, so the job goes to
a fresh `cai-dpo up` (embedded PostgreSQL, one generation worker on the bundled model) each time,
where its prompts get the same ids (1..n):
(a) batched (`CAI_MAX_IN_FLIGHT` 64: all prompts in flight together), (b) batched again,
(c) one by one (`CAI_MAX_IN_FLIGHT` 1). Prints how many of the initial answers (`rejected`) and
of the final revisions (`chosen`) of (b) and of (c) are identical to those of (a).
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
from generation import HH_PATH, hh_prompts
from service import running_service


def run_job(args: argparse.Namespace, in_flight: int) -> list[dict]:
    env = {"CAI_MAX_IN_FLIGHT": str(in_flight), "CAI_LOG_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "1"}
    body = {
        "prompts": hh_prompts(HH_PATH, args.prompts),
        "constitution": "harmless",
        "revisions": 1,
        "sampling": {"max_tokens": args.max_tokens, "seed": args.seed},
    }
    with (
        running_service(workers=True, env=env, timeout=600) as (url, _, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        job = http.post("/generate", json=body).json()["job_id"]
        while http.get(f"/jobs/{job}").json()["status"] not in ("done", "failed", "cancelled"):
            time.sleep(1)
        pairs = http.get("/pairs", params={"job_id": job, "limit": 500, "include_flagged": "true"}).json()[
            "items"
        ]
    by_prompt = {pair["prompt_id"]: pair for pair in pairs}
    return [by_prompt.get(prompt_id, {}) for prompt_id in range(1, args.prompts + 1)]


def same(a: list[dict], b: list[dict], field: str) -> int:
    return sum(
        1 for x, y in zip(a, b, strict=True) if x.get(field) is not None and x.get(field) == y.get(field)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    batched, again, alone = run_job(args, 64), run_job(args, 64), run_job(args, 1)
    print(
        json.dumps(
            {
                "bench": "seeds",
                "prompts": args.prompts,
                "pairs": [len([p for p in run if p]) for run in (batched, again, alone)],
                "same_concurrency": {
                    "rejected": same(batched, again, "rejected"),
                    "chosen": same(batched, again, "chosen"),
                },
                "batched_vs_one_by_one": {
                    "rejected": same(batched, alone, "rejected"),
                    "chosen": same(batched, alone, "chosen"),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
