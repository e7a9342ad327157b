"""Generation throughput: the service end to end against raw vLLM doing the same token work.

    python bench/generation.py [--prompts 64] [--revisions 2] [--max-tokens 128]

(a) raw vLLM: `LLM.chat` over all prompts, stage by stage (initial answers, then each round's
    critiques, then its revisions), with the same few-shot turns, principles and sampling: the
    ceiling for this token work, since every stage is one big batch.
(b) the service: `cai-dpo up` (embedded PostgreSQL, one generation worker), `POST /generate`,
    poll `GET /jobs/{id}` until done; tokens counted from the stored pairs.
Prints generated tokens/s of each, the ratio (b)/(a) (target >= 0.9) and the prefix-cache hit
rate of each. Each side runs in its own process; the engine start is not timed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

from cai_dpo.core.pair_import import parse_pair

ROOT = Path(__file__).resolve().parent.parent
# The HH-RLHF excerpt committed with the tests (a data file: the benchmarks import no test code).
HH_PATH = ROOT / "tests" / "data" / "hh-rlhf-harmless-test-800.jsonl.gz"


def hh_prompts(path: Path, n: int) -> list[str]:
    """The first `n` distinct first human turns (red-team style prompts) shorter than 400 characters."""
    prompts: list[str] = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            text = parse_pair(json.loads(line)).prompt[0]["content"].strip()
            if text not in prompts and len(text) < 400:
                prompts.append(text)
            if len(prompts) == n:
                return prompts
    raise SystemExit(f"{path} has fewer than {n} prompts")


def raw_vllm(args: argparse.Namespace) -> dict:
    """Stage-by-stage `LLM.chat` with the trajectory's own principle choice and few-shot turns."""
    from vllm import LLM, SamplingParams

    from cai_dpo.core.constitutions import ConstitutionStore
    from cai_dpo.core.model_sources import prepare_bundled_model
    from workers.generation.trajectory import few_shot_turns, principle_for, with_few_shot

    spec = ConstitutionStore(ROOT / "constitutions").get(args.constitution).spec
    few_shot = few_shot_turns(spec)
    prompts = hh_prompts(Path(args.data), args.prompts)
    model = prepare_bundled_model(ROOT / "data" / "models")
    llm = LLM(
        model=str(model),
        enable_prefix_caching=True,
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        dtype=args.dtype,
    )
    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens)
    convs = [with_few_shot(few_shot, [{"role": "user", "content": p}]) for p in prompts]
    generated = prompt_tokens = cached = 0

    def chat(conversations):
        nonlocal generated, prompt_tokens, cached
        outputs = llm.chat(conversations, params, use_tqdm=False)
        for out in outputs:
            generated += len(out.outputs[0].token_ids)
            prompt_tokens += len(out.prompt_token_ids)
            cached += out.num_cached_tokens or 0
        return [out.outputs[0].text.strip() for out in outputs]

    started = time.perf_counter()
    current = chat(convs)
    for round_index in range(args.revisions):
        # Prompt ids 1..n: the ids the service's fresh database gives the same prompts.
        principles = [principle_for(spec, i + 1, round_index) for i in range(len(prompts))]
        convs = [
            c + [{"role": "assistant", "content": a}, {"role": "user", "content": p.critique}]
            for c, a, p in zip(convs, current, principles, strict=True)
        ]
        critiques = chat(convs)
        convs = [
            c + [{"role": "assistant", "content": k}, {"role": "user", "content": p.revision}]
            for c, k, p in zip(convs, critiques, principles, strict=True)
        ]
        current = chat(convs)
    seconds = time.perf_counter() - started
    return {
        "side": "raw_vllm",
        "seconds": round(seconds, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 1),
        "prefix_cache_hit_rate": round(cached / prompt_tokens, 3),
    }


def service(args: argparse.Namespace) -> dict:
    import httpx
    from service import running_service  # bench/ is on sys.path: this file runs as a script

    prompts = hh_prompts(Path(args.data), args.prompts)
    env = {
        "CAI_MAX_TOKENS": str(args.max_tokens),
        "CAI_TEMPERATURE": str(args.temperature),
        "CAI_MAX_IN_FLIGHT": str(args.prompts),
        "CAI_CLAIM_BATCH": str(args.prompts),
        "CAI_VLLM_KV_CACHE_GIB": str(args.kv_cache_gib),
        "CAI_VLLM_DTYPE": args.dtype,
        "CAI_LOG_LEVEL": "WARNING",
    }
    with (
        running_service(workers=True, env=env) as (url, _, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        started = time.perf_counter()
        body = {"prompts": prompts, "constitution": args.constitution, "revisions": args.revisions}
        job_id = http.post("/generate", json=body).json()["job_id"]
        while (state := http.get(f"/jobs/{job_id}").json())["status"] not in ("done", "failed"):
            time.sleep(0.25)
        seconds = time.perf_counter() - started
        generated = 0
        cursor = None
        while True:
            page = http.get(
                "/pairs",
                params={
                    "job_id": job_id,
                    "include_flagged": True,
                    "limit": 500,
                    **({"cursor": cursor} if cursor else {}),
                },
            ).json()
            for item in page["items"]:
                generated += http.get(f"/pairs/{item['id']}").json()["usage"]["completion_tokens"]
            if not (cursor := page["next_cursor"]):
                break
        (worker,) = [w for w in http.get("/workers").json() if w["kind"] == "generate"]
    stats = worker["stats"]
    return {
        "side": "service",
        "seconds": round(seconds, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 1),
        "prefix_cache_hit_rate": round(stats["cached_prompt_tokens"] / max(stats["prompt_tokens"], 1), 3),
        "pairs": state["counts"]["done"],
        "failed": state["counts"]["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--revisions", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data", default=str(HH_PATH))
    parser.add_argument("--side", choices=["raw", "service"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype == "auto":  # the same rule as VLLMEngine: float32 on every CPU
        import torch

        args.dtype = "auto" if torch.cuda.is_available() else "float32"
    if args.side:
        print(json.dumps(raw_vllm(args) if args.side == "raw" else service(args)))
        return
    results = {}
    for side in ("raw", "service"):  # separate processes: one engine at a time, separate memory
        argv = [sys.executable, __file__, "--side", side] + sys.argv[1:]
        out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not line:
            raise SystemExit(f"{side} failed:\n{out.stderr[-4000:]}")
        results[side] = json.loads(line[-1])
        print(line[-1])
    ratio = results["service"]["tokens_per_s"] / results["raw"]["tokens_per_s"]
    print(
        json.dumps(
            {
                "bench": "generation",
                "prompts": args.prompts,
                "revisions": args.revisions,
                "max_tokens": args.max_tokens,
                "dtype": args.dtype,
                "ratio_service_over_raw": round(ratio, 3),
                "target": 0.9,
            }
        )
    )


if __name__ == "__main__":
    main()
