"""AI-feedback throughput: the service's judge against raw vLLM scoring the same questions, and the
cost of `verify` on a revise job.

    python bench/judge.py [--comparisons 64] [--k 1] [--prompts 32]

(a) raw vLLM: every judge question (each comparison in both orders, `k` principles) rendered as
    the judge renders it, sent as one batch to `LLM.generate` for one token with the option
    tokens' log-probs (`logprob_token_ids`): the ceiling for this work.
(b) the service's `Judge` on the in-process `VLLMEngine` (AsyncLLM), all comparisons at once, as
    the generation worker runs them. Prints comparisons/s of each and the ratio (target >= 0.9).
(c) verify: the same revise job (HH prompts, 1 revision) through a real generation worker and
    PostgreSQL, without and with `verify: {scorer: {kind: judge}}`; prints the extra time as a
    fraction of the plain job's.
Each side runs in its own process (one engine at a time); engine start is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "models" / "smollm2-135m-instruct"


def questions(args: argparse.Namespace) -> list[tuple[list[dict[str, str]], str, str]]:
    """(conversation, first, second) triples: HH prompts with their human chosen/rejected answers."""
    import gzip

    from generation import HH_PATH  # the committed excerpt (bench/ is this script's folder)

    from cai_dpo.core.pair_import import parse_pair

    triples = []
    with gzip.open(HH_PATH, "rt") as handle:
        for line in handle:
            pair = parse_pair(json.loads(line))
            if len(pair.prompt) == 1 and len(pair.chosen) < 600 and len(pair.rejected) < 600:
                triples.append((pair.prompt, pair.chosen, pair.rejected))
            if len(triples) == args.comparisons:
                return triples
    raise SystemExit("not enough pairs in the excerpt")


def engine_options(args: argparse.Namespace) -> dict:
    return {
        "max_model_len": 2048,
        "enforce_eager": True,
        "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30),
    }


def raw(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cai_dpo.core.constitutions import ConstitutionStore
    from workers.scoring.base import derived_seed, sample_principles
    from workers.scoring.judge import ANSWER_PREFIX, OPTIONS, judge_messages

    spec = ConstitutionStore(ROOT / "constitutions").get(args.constitution).spec
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    option_ids = [tokenizer.encode(o, add_special_tokens=False)[0] for o in OPTIONS]
    prefix = tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    prompts = []
    for n, (conversation, first, second) in enumerate(questions(args)):
        for principle in sample_principles(spec.comparison_principles(), args.k, derived_seed("bench", n)):
            for a, b in ((first, second), (second, first)):
                ids = tokenizer.apply_chat_template(
                    judge_messages(conversation, principle.question, a, b),
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
                prompts.append(TokensPrompt(prompt_token_ids=list(ids) + prefix))
    llm = LLM(model=str(MODEL), enable_prefix_caching=True, **engine_options(args))
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2, logprob_token_ids=option_ids)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm up
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    assert all(set(option_ids) <= set(o.outputs[0].logprobs[0]) for o in outputs)
    return {"side": "raw vLLM", "requests": len(prompts), "seconds": round(seconds, 2)}


def service(args: argparse.Namespace) -> dict:
    from cai_dpo.core.constitutions import ConstitutionStore
    from workers.generation.engines import VLLMEngine
    from workers.scoring.base import derived_seed
    from workers.scoring.judge import Judge

    spec = ConstitutionStore(ROOT / "constitutions").get(args.constitution).spec
    triples = questions(args)

    async def main() -> dict:
        engine = VLLMEngine(MODEL, name="smollm2-135m-instruct", **engine_options(args))
        await engine.start()
        judge = Judge(engine, spec, k=args.k)
        await judge.compare(*triples[0], seed=0)  # warm up
        started = time.perf_counter()
        results = await asyncio.gather(
            *(judge.compare(c, a, b, seed=derived_seed("bench", n)) for n, (c, a, b) in enumerate(triples))
        )
        seconds = time.perf_counter() - started
        await engine.shutdown()
        assert all(0.0 <= r.p_first <= 1.0 for r in results)
        return {"side": "service judge", "requests": len(triples) * args.k * 2, "seconds": round(seconds, 2)}

    return asyncio.run(main())


def verify_cost(args: argparse.Namespace) -> dict:
    """The same revise job without and with verify, through a real worker and database."""
    import tempfile

    from generation import HH_PATH, hh_prompts

    from cai_dpo.core.constitutions import ConstitutionStore
    from cai_dpo.core.db import get_engine, session_scope, start_embedded_postgres, upgrade_database
    from cai_dpo.core.generation_modes import Sampling
    from cai_dpo.core.queries import constitutions as constitution_queries
    from cai_dpo.core.queries import jobs as job_queries
    from cai_dpo.core.queries.jobs import job_options
    from cai_dpo.core.settings import Settings
    from cai_dpo.core.tables import Prompt
    from workers.generation.engines import VLLMEngine
    from workers.generation.worker import GenerationWorker

    prompts = [[{"role": "user", "content": p}] for p in hh_prompts(HH_PATH, args.prompts)]
    with tempfile.TemporaryDirectory(prefix="cai-judge-bench-") as folder:
        url = start_embedded_postgres(Path(folder))
        upgrade_database(url)
        settings = Settings(
            database_url=url,
            data_dir=Path(folder),
            max_in_flight=args.prompts,
            claim_batch=args.prompts,
            max_tokens=args.max_tokens,
            poll_seconds=0.2,
        )
        db = get_engine(settings, pool_size=4)
        engine = VLLMEngine(MODEL, name=settings.model, **engine_options(args))

        class Kept:  # the worker's shutdown leaves the engine for the next job
            def __getattr__(self, name):
                return getattr(engine, name)

            async def start(self):
                await engine.start()

            async def shutdown(self):
                pass

        def run_job(options: dict) -> float:
            constitution = ConstitutionStore(ROOT / "constitutions").get(args.constitution)
            with session_scope(db) as session:
                version = constitution_queries.store_constitution_version(session, constitution)
                job = job_queries.create_generation_job(
                    session,
                    constitution_version=version,
                    model=settings.model,
                    revisions=1,
                    sampling=Sampling(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, seed=0),
                    metadata={},
                    prompts=prompts,
                    idempotency_key=None,
                    request_hash=None,
                    options=job_options(options),
                )
                job_id = job.id
            worker = GenerationWorker(settings, db, url=url, engine_factory=lambda *_: Kept())

            def finished() -> bool:
                with session_scope(db) as session:
                    return (
                        not session.query(Prompt)
                        .filter(Prompt.job_id == job_id, Prompt.status.in_(("queued", "running")))
                        .count()
                    )

            async def main() -> float:
                await engine.start()
                started = time.perf_counter()
                task = asyncio.create_task(worker.run())
                while not await asyncio.to_thread(finished):
                    await asyncio.sleep(0.2)
                seconds = time.perf_counter() - started
                worker.stop()
                await task
                return seconds

            return asyncio.run(main())

        plain = run_job({})
        verified = run_job({"mode": "revise", "verify": {"scorer": {"kind": "judge", "k": args.k}}})
        asyncio.run(engine.shutdown())
        db.dispose()
    return {
        "side": "verify",
        "prompts": args.prompts,
        "revise_s": round(plain, 2),
        "revise_with_verify_s": round(verified, 2),
        "extra_fraction": round(verified / plain - 1, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--comparisons", type=int, default=64)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32, help="prompts of the verify job")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--side", choices=["raw", "service", "verify"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run = {"raw": raw, "service": service, "verify": verify_cost}[args.side]
        print(json.dumps(run(args)), flush=True)
        return
    results = {}
    for side in ("raw", "service", "verify"):
        out = subprocess.run(
            [sys.executable, __file__, "--side", side, *sys.argv[1:]],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"{side} failed:\n{out.stderr[-4000:]}")
        results[side] = json.loads(lines[-1])
        print(lines[-1], flush=True)
    raw_rate = results["raw"]["requests"] / results["raw"]["seconds"]
    ours = results["service"]["requests"] / results["service"]["seconds"]
    print(
        json.dumps(
            {
                "bench": "judge",
                "comparisons": args.comparisons,
                "k": args.k,
                "raw_comparisons_per_s": round(raw_rate / (2 * args.k), 2),
                "service_comparisons_per_s": round(ours / (2 * args.k), 2),
                "ratio_service_over_raw": round(ours / raw_rate, 3),
                "target": 0.9,
                "verify_extra_fraction": results["verify"]["extra_fraction"],
            }
        )
    )


if __name__ == "__main__":
    main()
