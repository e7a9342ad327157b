"""The generation worker: claim prompts, run their trajectories on one engine, write pairs.

One process holds one engine and runs up to `CAI_MAX_IN_FLIGHT` trajectories as asyncio tasks,
refilling as each finishes, so the engine's continuous batching always has work and no prompt
waits for another. Leases are renewed by a heartbeat; SIGTERM stops claiming and gives the
prompts in flight back at once. Database calls are synchronous SQLAlchemy run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import asdict
from typing import Any

import psycopg
from sqlalchemy import Engine as DBEngine
from sqlalchemy.exc import SQLAlchemyError

from app import queries
from app.constitutions import ConstitutionSpec
from app.db import database_url, get_engine, libpq_url, run_in_session
from app.settings import Settings
from workers.generation.engines import Engine, PromptTooLong, Sampling, make_engine
from workers.generation.trajectory import few_shot_turns, quality_flags, run_trajectory
from workers.models import trained_model_path

log = logging.getLogger(__name__)


class GenerationWorker:
    def __init__(self, settings: Settings, db: DBEngine, *, url: str, engine_factory=make_engine):
        self.settings = settings
        self.db = db
        self.url = url
        self.engine_factory = engine_factory
        self.id = f"gen-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.engine: Engine | None = None
        # The model name jobs ask for (`smollm2-135m-instruct`, `train:3`); a remote engine may
        # call the same model something else.
        self.model = settings.model
        self.unloadable: dict[str, float] = {}
        self.in_flight: dict[int, asyncio.Task] = {}
        self.stopping = asyncio.Event()
        self.wakeup = asyncio.Event()
        self.specs: dict[str, tuple[ConstitutionSpec, list[dict[str, str]]]] = {}
        self.pairs_written = 0
        self._last_tokens = (time.monotonic(), 0)

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.engine = await self.start_engine(self.settings.model)
        background = [asyncio.create_task(self.heartbeat_loop()), asyncio.create_task(self.listen_loop())]
        try:
            while not self.stopping.is_set():
                # Cleared before the claim: a NOTIFY that lands while it runs still wakes the wait.
                self.wakeup.clear()
                claimed = await self.claim()
                for prompt in claimed:
                    self.in_flight[prompt.id] = asyncio.create_task(self.process(prompt))
                if not claimed and not self.in_flight:
                    await self.maybe_switch_model()
                await self.wait_for_work(queue_had_work=bool(claimed))
        finally:
            await self.release_all()
            for task in background:
                task.cancel()
            await self.db_call(queries.mark_worker_stopped, self.id)
            await self.engine.shutdown()
            log.info("worker %s stopped (%d pairs written)", self.id, self.pairs_written)

    async def claim(self) -> list[queries.ClaimedPrompt]:
        free = self.settings.max_in_flight - len(self.in_flight)
        if free <= 0 or self.stopping.is_set():
            return []
        try:
            return await self.db_call(
                queries.claim_prompts,
                worker_id=self.id,
                model=self.model,
                n=min(free, self.settings.claim_batch),
                lease_seconds=self.settings.lease_seconds,
                max_attempts=self.settings.max_attempts,
            )
        except SQLAlchemyError as exc:  # the database restarting: keep the trajectories, retry
            log.warning("claim failed (%s); retrying after the poll interval", exc.__class__.__name__)
            return []

    async def wait_for_work(self, *, queue_had_work: bool) -> None:
        """Sleep until a trajectory finishes (a free slot), a NOTIFY, a stop, or the poll interval."""
        if queue_had_work and len(self.in_flight) < self.settings.max_in_flight:
            return  # the queue had prompts and there is room: claim again at once
        waiters = [asyncio.create_task(self.wakeup.wait()), asyncio.create_task(self.stopping.wait())]
        waiters += list(self.in_flight.values())
        await asyncio.wait(waiters, timeout=self.settings.poll_seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters[:2]:
            waiter.cancel()

    async def process(self, prompt: queries.ClaimedPrompt) -> None:
        """Run one trajectory and write its pair, or record why it failed."""
        try:
            spec, few_shot = await self.constitution(prompt.constitution_version_id, prompt.constitution_hash)
            sampling = Sampling(
                temperature=prompt.sampling["temperature"],
                top_p=prompt.sampling["top_p"],
                max_tokens=prompt.sampling["max_tokens"],
                seed=prompt.sampling.get("seed"),
            )
            trajectory = await run_trajectory(
                self.engine,
                spec=spec,
                prompt_id=prompt.id,
                prompt=prompt.messages,
                revisions=prompt.revisions,
                sampling=sampling,
                few_shot=few_shot,
                request_prefix=f"{self.id}-a{prompt.attempts}-",
            )
            pair = {
                "job_id": prompt.job_id,
                "source": "generated",
                "constitution_name": prompt.constitution_name,
                "constitution_version_id": prompt.constitution_version_id,
                "prompt": prompt.messages,
                "chosen": trajectory.chosen,
                "rejected": trajectory.initial,
                "trajectory": trajectory.to_record() | {"worker": self.id, "attempt": prompt.attempts},
                "flags": quality_flags(
                    rejected=trajectory.initial,
                    chosen=trajectory.chosen,
                    finish_reasons=trajectory.finish_reasons,
                ),
                "model": prompt.model,
                "sampling": prompt.sampling,
                "usage": trajectory.usage,
            }
            if await self.db_call(queries.complete_prompt, worker_id=self.id, prompt_id=prompt.id, pair=pair):
                self.pairs_written += 1
            else:
                log.warning("prompt %d: lease lost before its pair was written; discarded", prompt.id)
        except PromptTooLong as exc:
            await self.fail(prompt, f"prompt too long: {exc}", retryable=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one prompt's failure must not stop the worker
            log.exception("prompt %d failed", prompt.id)
            await self.fail(prompt, f"{type(exc).__name__}: {exc}", retryable=True)
        finally:
            # After a lost lease this worker may already have claimed the prompt again.
            if self.in_flight.get(prompt.id) is asyncio.current_task():
                del self.in_flight[prompt.id]

    async def fail(self, prompt: queries.ClaimedPrompt, error: str, *, retryable: bool) -> None:
        status = await self.db_call(
            queries.fail_prompt,
            worker_id=self.id,
            prompt_id=prompt.id,
            error=error,
            retryable=retryable,
            max_attempts=self.settings.max_attempts,
        )
        log.warning("prompt %d -> %s: %s", prompt.id, status, error)

    # --- around the loop --------------------------------------------------------------------

    async def constitution(
        self, version_id: int, content_hash: str
    ) -> tuple[ConstitutionSpec, list[dict[str, str]]]:
        """The exact constitution text the job was created with (cached by content hash)."""
        if content_hash not in self.specs:
            row = await self.db_call(queries.get_constitution_version, version_id)
            spec = ConstitutionSpec.model_validate(row.spec)
            self.specs[content_hash] = (spec, few_shot_turns(spec))
        return self.specs[content_hash]

    async def start_engine(self, model: str) -> Engine:
        started = time.monotonic()
        trained_path = await self.db_call(trained_model_path, model)
        engine = self.engine_factory(self.settings, model, trained_path)
        await engine.start()
        log.info("engine for %s ready in %.1f s", model, time.monotonic() - started)
        return engine

    async def maybe_switch_model(self) -> None:
        """Idle, with prompts waiting for another model (e.g. `train:<id>`): load that model."""
        waiting = await self.db_call(queries.claimable_models)
        now = time.monotonic()
        models = [m for m in waiting if now - self.unloadable.get(m, -1e9) > 600]
        if not models or self.model in waiting or self.settings.engine != "vllm":
            return
        log.info("switching model %s -> %s", self.model, models[0])
        await self.engine.shutdown()
        try:
            self.engine, self.model = await self.start_engine(models[0]), models[0]
        except Exception:
            # Not loadable here (e.g. its folder is on another host): leave it to other workers.
            log.exception("cannot load model %s; back to %s for 10 minutes", models[0], self.settings.model)
            self.unloadable[models[0]] = now
            self.engine, self.model = await self.start_engine(self.settings.model), self.settings.model

    async def heartbeat_loop(self) -> None:
        """Renew the leases of prompts in flight; a lease lost means another worker owns the prompt."""
        interval = self.settings.lease_seconds / 3
        last_renewal = time.monotonic()
        while True:
            try:
                held = await self.db_call(
                    queries.renew_prompt_leases,
                    worker_id=self.id,
                    prompt_ids=list(self.in_flight),
                    lease_seconds=self.settings.lease_seconds,
                )
                # A starved host (CPU, database) shows here before leases start to run out.
                now = time.monotonic()
                gap = now - last_renewal
                if gap > 2 * interval:
                    log.warning(
                        "leases renewed %.1f s apart (CAI_LEASE_SECONDS=%g); a longer lease avoids "
                        "prompts moving to other workers",
                        gap,
                        self.settings.lease_seconds,
                    )
                last_renewal = now
                for prompt_id in set(self.in_flight) - held:
                    log.warning("prompt %d: lease lost; stopping its trajectory", prompt_id)
                    self.in_flight[prompt_id].cancel()
                await self.db_call(queries.record_worker_heartbeat, **self.status())
            except Exception:  # noqa: BLE001 - a database blip must not kill the heartbeat
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    def status(self) -> dict[str, Any]:
        stats = self.engine.stats() if self.engine else None
        now, tokens = time.monotonic(), (stats.completion_tokens if stats else 0)
        last_time, last_tokens = self._last_tokens
        rate = (tokens - last_tokens) / (now - last_time) if now > last_time else 0.0
        self._last_tokens = (now, tokens)
        return {
            "id": self.id,
            "kind": "generate",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "model": self.model,
            "in_flight": len(self.in_flight),
            "tokens_per_s": round(max(rate, 0.0), 2),
            "stats": {"pairs_written": self.pairs_written}
            | (
                asdict(stats) | {"prefix_cache_hit_rate": round(stats.prefix_cache_hit_rate, 4)}
                if stats
                else {}
            ),
        }

    async def listen_loop(self) -> None:
        """LISTEN for new prompts so an idle worker wakes at once; polling is the fallback."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    libpq_url(self.url), autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {queries.PROMPTS_CHANNEL}")
                    async for _ in conn.notifies():
                        self.wakeup.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("LISTEN connection lost (%s); polling until it is back", exc)
                await asyncio.sleep(self.settings.poll_seconds)

    async def release_all(self) -> None:
        """Stop every trajectory in flight and hand its prompt back to the queue at once."""
        ids = list(self.in_flight)
        for task in self.in_flight.values():
            task.cancel()
        await asyncio.gather(*self.in_flight.values(), return_exceptions=True)
        released = await self.db_call(queries.release_prompts, worker_id=self.id, prompt_ids=ids)
        if ids:
            log.info("released %d prompts in flight", released)

    async def db_call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(run_in_session, self.db, fn, *args, **kwargs)


async def run_worker(settings: Settings) -> None:
    url = database_url(settings)
    worker = GenerationWorker(settings, get_engine(settings, pool_size=4), url=url)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    log.info(
        "generation worker %s starting (model %s, %d in flight)",
        worker.id,
        settings.model,
        settings.max_in_flight,
    )
    await worker.run()


def main(settings: Settings) -> int:
    asyncio.run(run_worker(settings))
    return 0
