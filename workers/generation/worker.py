"""The generation worker: claim prompts, run their trajectories on one engine, write pairs.

One process holds one engine and keeps a target number of trajectories in flight as asyncio
tasks (`CAI_MAX_IN_FLIGHT`, or sized to the engine's batch: `in_flight.py`), claiming again in
one statement whenever an eighth of the target is free, so the engine's continuous batching
always has work and no prompt waits for another. Finished prompts are committed in batches
(`writer.py`): the database cost per pair is a small fraction of one statement. Leases are
renewed by a heartbeat, which also settles rows nobody may claim any more; SIGTERM stops
claiming, commits the pairs already made and gives the prompts in flight back at once. Database
calls are synchronous SQLAlchemy run in threads, few enough that a thread per call costs little.

Only a prompt's own fault (too long for the context, a request error of its own) costs it an
attempt. An engine that is down (its process died, the server is unreachable, or
`CAI_ENGINE_ERROR_LIMIT` requests failed in a row) costs none: the worker gives every prompt it
holds back at once, reports the problem in its heartbeat (`/workers`, `/health`, `/metrics`),
and restarts the engine; after `CAI_ENGINE_RESTARTS` failed restarts it exits non-zero so its
supervisor (`cai-dpo up`, compose's restart policy) starts a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict
from typing import Any

from sqlalchemy import Engine as DBEngine
from sqlalchemy.exc import SQLAlchemyError

from cai_dpo.core import queue
from cai_dpo.core.constitutions import ConstitutionSpec
from cai_dpo.core.db import database_url, get_engine
from cai_dpo.core.generation_modes import CalibrateOptions, CompareOptions, GenerationMode, ScorerSpec
from cai_dpo.core.model_sources import resolve_model, trained_model_path
from cai_dpo.core.queries import calibrations as calibration_queries
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.settings import Settings
from cai_dpo.core.tables import Comparison, Pair
from workers.generation.calibrate import judge_pair
from workers.generation.engines import (
    Engine,
    EngineError,
    EngineUnavailable,
    PromptTooLong,
    make_engine,
)
from workers.generation.in_flight import EngineShare, InFlightTarget, SharedEngineTime
from workers.generation.modes import PairDraft, compare_models, ranked_pair, revise_pair
from workers.generation.trajectory import few_shot_turns
from workers.generation.writer import Finished, ResultWriter
from workers.runtime import DatabaseUnavailable, WorkerRuntime
from workers.scoring import Scorer, make_scorer

log = logging.getLogger(__name__)


class GenerationWorker(WorkerRuntime):
    role = "generate"

    def __init__(self, settings: Settings, db: DBEngine, *, url: str, engine_factory=make_engine):
        super().__init__(settings, db, url=url, kind=queue.PROMPTS)
        self.engine_factory = engine_factory
        self.engine: Engine | None = None
        # The model name jobs ask for (`smollm2-135m-instruct`, `train:3`); a remote engine may
        # call the same model something else.
        self.model = settings.model
        self.unloadable: dict[str, float] = {}
        self.specs: dict[str, tuple[ConstitutionSpec, list[dict[str, str]]]] = {}
        self.scorers: dict[tuple[str, str], Scorer] = {}
        # Engines of other models, started for judges that are not this worker's model.
        self.extra_engines: dict[str, Engine] = {}
        self.extra_engines_starting = asyncio.Lock()
        self.pairs_written = 0
        self._last_tokens = (time.monotonic(), 0)
        # Set by a trajectory that found the engine down; the loop then recovers it.
        self.engine_down = asyncio.Event()
        self.engine_down_reason = ""
        self.engine_errors_in_a_row = 0
        # Finished prompts are committed in batches; set when a finished trajectory leaves room
        # for a claim worth making.
        self.writer = ResultWriter(self.write_results, max_batch=settings.write_batch)
        self.room_freed = asyncio.Event()
        self.target = InFlightTarget(fixed=settings.max_in_flight)
        # Each pair's `usage.engine_seconds`: its share of this worker's engine time.
        self.engine_time = SharedEngineTime()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.engine = await self.start_engine(self.settings.model)
        background = [
            *self.start_background(),
            asyncio.create_task(self.writer.run()),
            asyncio.create_task(self.steer_in_flight()),
        ]
        try:
            while not self.stopping.is_set():
                if self.engine_down.is_set():
                    await self.recover_engine()
                    continue
                # Cleared before the claim: a NOTIFY that lands while it runs still wakes the wait.
                self.wakeup.clear()
                room = self.in_flight_target() - len(self.in_flight)
                if room < self.refill_size():
                    # Full: claiming a few prompts at a time would cost a statement per pair.
                    self.room_freed.clear()
                    room_freed = asyncio.ensure_future(self.room_freed.wait())
                    try:
                        await self.wait_for_work(room_freed)
                    finally:
                        room_freed.cancel()
                    continue
                asked = min(room, self.settings.claim_batch)
                claimed = await self.claim(asked)
                for prompt in claimed:
                    self.start_trajectory(prompt)
                if not claimed and not self.in_flight:
                    await self.maybe_switch_model()
                if len(claimed) < asked:
                    # The queue is drained for now: new prompts come with a NOTIFY (or the poll).
                    await self.wait_for_work()
        except DatabaseUnavailable as exc:
            self.give_up(exc)
        finally:
            # With the database gone for good the prompts cannot be handed back: their leases
            # run out instead. The engine is stopped either way (a live one keeps the process up).
            with contextlib.suppress(DatabaseUnavailable):
                await self.writer.flush()  # pairs already made are kept
                await self.release_all()
            await self.stop_background(background)
            await self.shutdown_engines()
            log.info("worker %s stopped (%d pairs written)", self.id, self.pairs_written)

    def in_flight_target(self) -> int:
        """How many trajectories to keep running now (`CAI_MAX_IN_FLIGHT`, or steered)."""
        return self.target.value

    async def steer_in_flight(self) -> None:
        """Twice a second, size the in-flight target to the engine's occupancy (`in_flight.py`)."""
        while True:
            await asyncio.sleep(0.5)
            if not self.target.steered or self.engine is None or self.engine_down.is_set():
                continue
            with contextlib.suppress(Exception):  # occupancy is advice: a failed read changes nothing
                await self.engine.refresh_stats()
            before = self.target.value
            self.target.observe(self.engine.stats(), in_flight=len(self.in_flight))
            if self.target.value != before:
                log.debug("in-flight target %d -> %d", before, self.target.value)
                if self.target.value - len(self.in_flight) >= self.refill_size():
                    self.room_freed.set()

    def refill_size(self) -> int:
        """Free slots worth a claim: an eighth of the target, so the engine stays at least 7/8
        full while a claim carries many prompts."""
        return max(1, min(self.settings.claim_batch, self.in_flight_target() // 8))

    @property
    def in_flight(self) -> dict[int, asyncio.Task]:
        """Prompts held, each with the task running its trajectory."""
        return self.leases.held

    def start_trajectory(self, prompt: job_queries.ClaimedPrompt) -> None:
        # A prompt claimed again after its lease ran out may still have its old task here.
        if (old := self.in_flight.get(prompt.id)) is not None:
            old.cancel()
        self.leases.hold(prompt.id, asyncio.create_task(self.process(prompt)))

    def lease_lost(self, prompt_id: int, task: asyncio.Task) -> None:
        log.warning("prompt %d: lease lost; stopping its trajectory", prompt_id)
        task.cancel()

    async def claim(self, n: int) -> list[job_queries.ClaimedPrompt]:
        if n <= 0 or self.stopping.is_set() or self.engine_down.is_set():
            return []
        try:
            return await self.db_call(
                job_queries.claim_prompts,
                worker_id=self.id,
                model=self.model,
                n=n,
                lease_seconds=self.settings.lease_seconds,
                max_attempts=self.settings.max_attempts,
                settle=False,  # the heartbeat settles (`queue.expire` in `WorkerRuntime.heartbeat_loop`)
            )
        except SQLAlchemyError as exc:  # the database restarting: keep the trajectories, retry
            log.warning("claim failed (%s); retrying after the poll interval", exc.__class__.__name__)
            return []

    async def process(self, prompt: job_queries.ClaimedPrompt) -> None:
        """Make the prompt's pair in its job's mode and write it, or record why it failed."""
        share = self.engine_time.start()
        try:
            await self.make_and_write(prompt, share)
        except DatabaseUnavailable as exc:  # the pair or its failure cannot be recorded: not its fault
            self.give_up(exc)
        finally:
            share.stop()
            # After a lost lease this worker may already have claimed the prompt again.
            self.leases.drop(prompt.id, asyncio.current_task())
            if self.in_flight_target() - len(self.in_flight) >= self.refill_size():
                self.room_freed.set()

    async def make_and_write(self, prompt: job_queries.ClaimedPrompt, share: EngineShare) -> None:
        try:
            if isinstance(prompt.options, CompareOptions):
                await self.write_comparison(prompt, prompt.options)
                return
            if isinstance(prompt.options, CalibrateOptions):
                await self.write_calibration(prompt, prompt.options)
                return
            draft = await self.make_pair(prompt)
            pair = draft.columns() | {
                "job_id": prompt.job_id,
                "source": "generated",
                "constitution_name": prompt.constitution_name,
                "constitution_version_id": prompt.constitution_version_id,
                "prompt": prompt.messages,
                "usage": draft.usage | {"engine_seconds": round(share.stop(), 6)},
                "trajectory": draft.trajectory | {"worker": self.id, "attempt": prompt.attempts},
                "model": prompt.model,
                "sampling": prompt.sampling.model_dump(mode="json"),
            }
            self.engine_errors_in_a_row = 0
            if await self.writer.submit(prompt.id, Pair, pair):
                self.pairs_written += 1
            else:
                log.warning("prompt %d: lease lost before its pair was written; discarded", prompt.id)
        except PromptTooLong as exc:
            await self.fail(prompt, f"prompt too long: {exc}", retryable=False)
        except EngineUnavailable as exc:
            await self.give_back_on_engine_failure(prompt, str(exc))
        except (asyncio.CancelledError, DatabaseUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - one prompt's failure must not stop the worker
            if isinstance(exc, EngineError):
                self.engine_errors_in_a_row += 1
                if self.engine_errors_in_a_row >= self.settings.engine_error_limit:
                    reason = f"{self.engine_errors_in_a_row} requests failed in a row, last: {exc}"
                    await self.give_back_on_engine_failure(prompt, reason)
                    return
            log.exception("prompt %d failed", prompt.id)
            await self.fail(prompt, f"{type(exc).__name__}: {exc}", retryable=True)

    async def write_results(self, batch: list[Finished]) -> set[int]:
        """One transaction for the batch: each prompt done and its result inserted, lease checked."""
        by_table: dict[Any, dict[int, dict[str, Any]]] = {}
        for item in batch:
            by_table.setdefault(item.table, {})[item.prompt_id] = item.values

        def complete(session: Any) -> set[int]:
            written: set[int] = set()
            for table, results in by_table.items():
                written |= job_queries.complete_prompts(session, table, worker_id=self.id, results=results)
            return written

        return await self.db_call(complete)

    async def write_comparison(self, prompt: job_queries.ClaimedPrompt, options: CompareOptions) -> None:
        """An evaluation's prompt: this worker's model and the baseline answer, the judges compare.

        A judge is never this worker's model (the trained one, a contestant): one that names no
        model (a job queued before judges were fixed at queue time) is the baseline's engine."""
        spec, _ = await self.constitution(prompt.constitution_version_id, prompt.constitution_hash)
        judges = []
        for judge_spec in options.panel():
            if (judge_spec.model or options.baseline) == prompt.model:
                await self.fail(
                    prompt, f"judge {prompt.model} is the model under evaluation", retryable=False
                )
                return
            judges.append(
                await self.scorer(judge_spec, spec, prompt.constitution_hash, default_model=options.baseline)
            )
        result = await compare_models(
            self.engine,
            await self.engine_for(options.baseline),
            judges,
            prompt_id=prompt.id,
            messages=prompt.messages,
            sampling=prompt.sampling,
            request_prefix=f"{self.id}-a{prompt.attempts}-",
        )
        self.engine_errors_in_a_row = 0
        comparison = result | {"job_id": prompt.job_id, "model_a": prompt.model, "model_b": options.baseline}
        if not await self.writer.submit(prompt.id, Comparison, comparison):
            log.warning("prompt %d: lease lost before its comparison was written; discarded", prompt.id)

    async def write_calibration(self, prompt: job_queries.ClaimedPrompt, options: CalibrateOptions) -> None:
        """A judge's calibration prompt: the judges compare the stored pair's chosen and rejected
        answers in both orders (`calibrate.py`)."""
        pair = await self.db_call(calibration_queries.pair_for_prompt, prompt.job_id, prompt.position)
        if pair is None:
            await self.fail(prompt, "the pair to judge is gone", retryable=False)
            return
        spec, _ = await self.constitution(prompt.constitution_version_id, prompt.constitution_hash)
        judges = [await self.scorer(judge, spec, prompt.constitution_hash) for judge in options.panel()]
        result = await judge_pair(
            judges,
            messages=prompt.messages,
            chosen=pair.chosen,
            rejected=pair.rejected,
            pair_id=pair.id,
            seed=prompt.sampling.seed or 0,
        )
        self.engine_errors_in_a_row = 0
        if not await self.writer.submit(prompt.id, Comparison, result | {"job_id": prompt.job_id}):
            log.warning("prompt %d: lease lost before its judgement was written; discarded", prompt.id)

    async def make_pair(self, prompt: job_queries.ClaimedPrompt) -> PairDraft:
        spec, few_shot = await self.constitution(prompt.constitution_version_id, prompt.constitution_hash)
        mode = prompt.options
        assert isinstance(mode, GenerationMode)  # comparisons went to write_comparison
        sampling = prompt.sampling
        scorer_spec = mode.effective_scorer()
        scorer = await self.scorer(scorer_spec, spec, prompt.constitution_hash) if scorer_spec else None
        request_prefix = f"{self.id}-a{prompt.attempts}-"
        if mode.mode == "revise":
            return await revise_pair(
                self.engine,
                spec=spec,
                prompt_id=prompt.id,
                messages=prompt.messages,
                revisions=prompt.revisions,
                sampling=sampling,
                few_shot=few_shot,
                request_prefix=request_prefix,
                verifier=scorer,
            )
        return await ranked_pair(
            self.engine,
            mode=mode.mode,
            n=mode.n,
            prompt_id=prompt.id,
            messages=prompt.messages,
            sampling=sampling,
            request_prefix=request_prefix,
            scorer=scorer,
        )

    async def scorer(
        self,
        spec: ScorerSpec,
        constitution: ConstitutionSpec,
        constitution_hash: str,
        *,
        default_model: str | None = None,
    ) -> Scorer:
        """The scorer a job names, built once per (scorer, constitution) and kept. A judge naming
        no model is `default_model`'s, else this worker's own."""
        if spec.kind == "judge" and spec.model is None and default_model is not None:
            spec = spec.model_copy(update={"model": default_model})
        key = (spec.model_dump_json(), constitution_hash)
        if key not in self.scorers:
            trained = await self.db_call(trained_model_path, spec.model) if spec.model else None

            def resolve_path(model: str) -> str:
                return str(resolve_model(model, self.settings, trained_path=trained))

            self.scorers[key] = make_scorer(
                spec, engine_for=self.engine_for, constitution_spec=constitution, resolve_path=resolve_path
            )
        return self.scorers[key]

    async def engine_for(self, model: str | None) -> Engine:
        """The engine of `model`: this worker's own, or a second one started for a judge model."""
        if model is None or model == self.model:
            return self.engine
        # One start at a time: concurrent trajectories asking for the same model get one engine.
        async with self.extra_engines_starting:
            if model not in self.extra_engines:
                self.extra_engines[model] = await self.start_engine(model, own=False)
        return self.extra_engines[model]

    async def shutdown_engines(self) -> None:
        """Stop every engine; scorers built on them go too (they are rebuilt on the next use)."""
        self.scorers.clear()
        engines = [self.engine, *self.extra_engines.values()]
        self.extra_engines.clear()
        for engine in engines:
            with contextlib.suppress(Exception):  # a dead engine may fail its own shutdown
                await asyncio.wait_for(engine.shutdown(), timeout=60)

    async def fail(self, prompt: job_queries.ClaimedPrompt, error: str, *, retryable: bool) -> None:
        status = await self.db_call(
            queue.fail,
            queue.PROMPTS,
            worker_id=self.id,
            id=prompt.id,
            error=error,
            retryable=retryable,
            max_attempts=self.settings.max_attempts,
        )
        log.warning("prompt %d -> %s: %s", prompt.id, status, error)

    async def give_back_on_engine_failure(self, prompt: job_queries.ClaimedPrompt, reason: str) -> None:
        """The engine, not the prompt, failed: the prompt goes back without spending an attempt."""
        if not self.engine_down.is_set():
            log.error("engine for %s is down: %s", self.model, reason)
            self.engine_down_reason = reason
            self.engine_down.set()
            self.wakeup.set()  # the loop may be waiting for work: it has to recover first
        await self.db_call(queue.release, queue.PROMPTS, worker_id=self.id, ids=[prompt.id])

    @staticmethod
    def restart_delay(attempt: int) -> float:
        """Seconds to wait after the `attempt`-th failed restart of the engine: 2, 4, 8 ... at most 30."""
        return min(2**attempt, 30)

    async def recover_engine(self) -> None:
        """Give back every prompt held, report the problem, then restart the engine; exit if it
        cannot be restarted (the supervisor starts a fresh worker process)."""
        self.problem = f"engine down: {self.engine_down_reason}"[:1000]
        await self.release_all()
        await self.report()
        for attempt in range(1, self.settings.engine_restarts + 1):
            if self.stopping.is_set():
                return
            await self.shutdown_engines()
            try:
                self.engine = await self.start_engine(self.model)
            except Exception:  # noqa: BLE001 - retried, then the process exits
                log.exception("engine restart %d of %d failed", attempt, self.settings.engine_restarts)
                await asyncio.sleep(self.restart_delay(attempt))
                continue
            log.info("engine for %s restarted (attempt %d)", self.model, attempt)
            self.problem, self.engine_errors_in_a_row = None, 0
            self.engine_down.clear()
            await self.report()
            return
        raise EngineRestartsExhausted(self.problem)

    # --- around the loop --------------------------------------------------------------------

    async def constitution(
        self, version_id: int, content_hash: str
    ) -> tuple[ConstitutionSpec, list[dict[str, str]]]:
        """The exact constitution text the job was created with (cached by content hash)."""
        if content_hash not in self.specs:
            row = await self.db_call(constitution_queries.get_constitution_version, version_id)
            spec = ConstitutionSpec.model_validate(row.spec)
            self.specs[content_hash] = (spec, few_shot_turns(spec))
        return self.specs[content_hash]

    async def start_engine(self, model: str, *, own: bool = True) -> Engine:
        started = time.monotonic()
        trained_path = await self.db_call(trained_model_path, model)
        engine = self.engine_factory(self.settings, model, trained_path)
        await engine.start()
        log.info("engine for %s ready in %.1f s", model, time.monotonic() - started)
        if own:  # a judge's engine does not size this worker's trajectories
            self.target.start(engine.stats(), engine_on_cpu=engine.on_cpu)
            log.info(
                "in flight: %d trajectories%s",
                self.target.value,
                ", steered by the engine's occupancy" if self.target.steered else "",
            )
        return engine

    async def maybe_switch_model(self) -> None:
        """Idle, with prompts waiting for another model (e.g. `train:<id>`): load that model."""
        waiting = await self.db_call(job_queries.claimable_models, max_attempts=self.settings.max_attempts)
        now = time.monotonic()
        models = [m for m in waiting if now - self.unloadable.get(m, -1e9) > 600]
        if not models or self.model in waiting or self.settings.engine != "vllm":
            return
        log.info("switching model %s -> %s", self.model, models[0])
        await self.shutdown_engines()
        try:
            self.engine, self.model = await self.start_engine(models[0]), models[0]
        except Exception:
            # Not loadable here (e.g. its folder is on another host): leave it to other workers.
            log.exception("cannot load model %s; back to %s for 10 minutes", models[0], self.settings.model)
            self.unloadable[models[0]] = now
            self.engine, self.model = await self.start_engine(self.settings.model), self.settings.model

    def status(self) -> dict[str, Any]:
        stats = self.engine.stats() if self.engine else None
        now, tokens = time.monotonic(), (stats.completion_tokens if stats else 0)
        last_time, last_tokens = self._last_tokens
        rate = (tokens - last_tokens) / (now - last_time) if now > last_time else 0.0
        self._last_tokens = (now, tokens)
        return self.base_status(
            model=self.model,
            in_flight=len(self.in_flight),
            tokens_per_s=round(max(rate, 0.0), 2),
            stats={"pairs_written": self.pairs_written, "in_flight_target": self.target.value}
            | (
                asdict(stats) | {"prefix_cache_hit_rate": round(stats.prefix_cache_hit_rate, 4)}
                if stats
                else {}
            ),
        )

    async def release_all(self) -> None:
        """Stop every trajectory in flight and hand its prompt back to the queue at once."""
        ids = list(self.in_flight)
        for task in self.in_flight.values():
            task.cancel()
        await asyncio.gather(*self.in_flight.values(), return_exceptions=True)
        released = await self.db_call(queue.release, queue.PROMPTS, worker_id=self.id, ids=ids)
        if ids:
            log.info("released %d prompts in flight", released)


class EngineRestartsExhausted(RuntimeError):
    """The engine could not be restarted in process: the worker exits for its supervisor."""


async def run_worker(settings: Settings) -> int:
    url = database_url(settings)
    worker = GenerationWorker(settings, get_engine(settings, pool_size=4), url=url)
    worker.install_signal_handlers()
    log.info("generation worker %s starting (model %s)", worker.id, settings.model)
    await worker.run()
    return worker.exit_code


def main(settings: Settings) -> int:
    """Run the worker until stopped; the exit code (3: the engine could not be restarted, 4: the
    database did not come back), so its supervisor knows to start a fresh process."""
    try:
        return asyncio.run(run_worker(settings))
    except EngineRestartsExhausted as exc:
        log.error("exiting: %s", exc)
        return 3
