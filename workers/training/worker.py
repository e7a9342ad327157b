"""The training worker: claim a training job, snapshot its pairs, run DPO, publish the model.

Jobs are claimed from the one queue under a lease, like prompts; the runtime's heartbeat renews
it while the trainer runs in a thread. The trainer checkpoints every N steps into the job's
folder, so a job whose worker died resumes from its last checkpoint on the next worker that
claims it. Idle, the worker also applies the automatic training policies (one job per batch of
new pairs, whatever the number of processes).

Under torchrun this class runs on rank 0 only: it claims, holds the lease, writes to the database
and the artifact, and hands each run to the other ranks, which train their share of it in the same
loop (distributed.py, loop.py). Evaluations stay on rank 0, in one process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Engine as DBEngine
from sqlalchemy.exc import SQLAlchemyError

from cai_dpo.core import queue
from cai_dpo.core.artifact_store import publish_model
from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.db import database_url, get_engine
from cai_dpo.core.evaluation import EvaluationRequest
from cai_dpo.core.export_format import prompt_key, prompt_split
from cai_dpo.core.generation_modes import SamplingRequest
from cai_dpo.core.model_sources import resolve_model, trained_model_path, training_output_dir
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import policies as policy_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.settings import Settings
from cai_dpo.core.tables import Evaluation, TrainingJob
from cai_dpo.core.training_params import TrainParams, TrainPolicyIn
from workers.runtime import DatabaseUnavailable, WorkerRuntime
from workers.training.data import PairExample

if TYPE_CHECKING:
    from workers.training.ranks import Ranks

log = logging.getLogger(__name__)


def split_train_eval(
    pairs: list[tuple[int, list[dict[str, str]]]], eval_fraction: float
) -> tuple[list[int], list[int]]:
    """Held-out pairs are the export's `test` split at the same fraction, by prompt: every pair of a
    prompt (several, after rounds with `train:<id>`) falls on one side. `pairs`: (id, prompt)."""
    sides: dict[str, str] = {}
    train, evals = [], []
    for pair_id, prompt in pairs:
        key = json.dumps(prompt, sort_keys=True)  # one hash per distinct prompt as stored
        if key not in sides:
            sides[key] = prompt_split(prompt, eval_fraction)
        (evals if sides[key] == "test" else train).append(pair_id)
    return train, evals


def prompts_in_training(
    prompts: list[list[dict[str, str]]], trained: list[list[dict[str, str]]]
) -> list[int]:
    """The indexes of `prompts` that are also prompts of `trained` (compared as `prompt_key`s)."""
    keys = {prompt_key(p) for p in trained}
    return [i for i, p in enumerate(prompts) if prompt_key(p) in keys]


class _Run:
    """The lease token of one training run: set `lost` when the job is no longer this worker's."""

    def __init__(self) -> None:
        self.lost = threading.Event()


class TrainingWorker(WorkerRuntime):
    role = "train"

    def __init__(self, settings: Settings, db: DBEngine, *, url: str, ranks: Ranks | None = None):
        super().__init__(settings, db, url=url, kind=queue.TRAINING)
        self.tokens_per_s = 0.0
        self.unsent_metrics: list[tuple[int, int, dict[str, float]]] = []
        # Under torchrun: this process is rank 0, the group's leader (distributed.py).
        self.ranks = ranks

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self.sync_policies_from_settings()
        background = self.start_background()
        try:
            while not self.stopping.is_set():
                self.wakeup.clear()
                try:
                    await self.queue_automatic_jobs()
                    await self.settle_evaluations()
                    job = await self.db_call(
                        training_queries.claim_training_job,
                        worker_id=self.id,
                        lease_seconds=self.settings.lease_seconds,
                        max_attempts=self.settings.max_attempts,
                    )
                    evaluation = None
                    if job is None:
                        evaluation = await self.db_call(
                            evaluation_queries.claim_evaluation,
                            worker_id=self.id,
                            lease_seconds=self.settings.lease_seconds,
                            max_attempts=self.settings.max_attempts,
                        )
                except (SQLAlchemyError, psycopg.Error) as exc:  # the database restarting
                    log.warning("database unavailable (%s); retrying after the poll interval", exc)
                    job = evaluation = None
                if job is not None:
                    await self.train(job)
                elif evaluation is not None:
                    await self.evaluate(evaluation)
                else:
                    await self.wait_for_work()
        except DatabaseUnavailable as exc:
            self.give_up(exc)
        finally:
            await self.stop_background(background)
            log.info("training worker %s stopped", self.id)

    async def train(self, job: TrainingJob) -> None:
        from workers.training.loop import TrainHooks, run_stages

        params = TrainParams.model_validate(job.params)
        log.info("training job %d: claimed (attempt %d)", job.id, job.attempts)
        run = _Run()
        self.leases.hold(job.id, run)  # renewed while the pairs load and the model is prepared
        try:
            train_ids, eval_ids = await self.snapshot_pairs(job, params)
            train_pairs, eval_pairs = await self.load_pairs(train_ids), await self.load_pairs(eval_ids)
            base = job.base_model or self.settings.model
            trained_path = await self.db_call(trained_model_path, base)
            # Off the event loop: the bundled model's first preparation, or a trained model fetched
            # from the artifact store, may take minutes.
            model_path = await asyncio.to_thread(
                resolve_model, base, self.settings, trained_path=trained_path
            )
        except DatabaseUnavailable:
            self.leases.drop(job.id, run)
            raise
        except Exception as exc:  # noqa: BLE001 - reported on the job
            self.leases.drop(job.id, run)
            log.exception("training job %d cannot start", job.id)
            await self.finish(job, "failed", error=str(exc)[:4000])
            return
        loop = asyncio.get_running_loop()

        def record_step(step: int, total: int, metrics: dict[str, float]) -> None:
            asyncio.run_coroutine_threadsafe(self.record_step(job.id, step, total, metrics), loop).result()

        def record_eval(when: str, metrics: dict[str, float]) -> None:
            asyncio.run_coroutine_threadsafe(
                self.db_call(
                    training_queries.update_training_job,
                    job.id,
                    worker_id=self.id,
                    **{f"eval_{when}": metrics},
                ),
                loop,
            ).result()

        hooks = TrainHooks(
            on_step=record_step,
            on_eval=record_eval,
            on_checkpoint=lambda step, path: log.info("training job %d: checkpoint at step %d", job.id, step),
            should_stop=lambda: self.stop_requested.is_set() or run.lost.is_set(),
        )
        output_dir = training_output_dir(self.settings.artifacts_dir, job.id, job.created_at)
        if self.ranks is None:
            trainer = functools.partial(
                run_stages,
                params,
                model_path=model_path,
                train_pairs=train_pairs,
                eval_pairs=eval_pairs,
                output_dir=output_dir,
                hooks=hooks,
                checkpoint_steps=self.settings.checkpoint_steps,
            )
        else:  # every rank of the group trains its share (distributed.py)
            from workers.training.distributed import TrainCommand, lead

            command = TrainCommand(
                params=params.model_dump(mode="json"),
                base_model=base,
                trained_path=trained_path,
                train_pairs=train_pairs,
                eval_pairs=eval_pairs,
                output_dir=str(output_dir),
                checkpoint_steps=self.settings.checkpoint_steps,
            )
            trainer = functools.partial(lead, self.ranks, command, self.settings, hooks)
        try:
            result = await asyncio.to_thread(trainer)
        except DatabaseUnavailable:  # from a hook: the run's fault it is not
            raise
        except Exception as exc:  # noqa: BLE001 - reported on the job
            log.exception("training job %d failed", job.id)
            await self.finish(job, "failed", error=f"{type(exc).__name__}: {exc}"[:4000])
            self.leave_group_after(exc)
            return
        finally:
            self.leases.drop(job.id, run)
        await self.settle(job, result, output_dir)

    def leave_group_after(self, exc: Exception) -> None:
        """A run that failed on some ranks and not in step (anything but a failed start) leaves the
        group's collectives out of step: stop, exit non-zero, and let torchrun start it afresh."""
        from workers.training.ranks import SetupFailed

        if self.ranks is not None and not isinstance(exc, SetupFailed):
            log.error("the torchrun group is out of step after a failed run; stopping it")
            self.exit_code = 1
            self.stop()

    def lease_lost(self, train_id: int, run: _Run) -> None:
        log.warning("training job %d: lease lost (cancelled, or taken over); stopping", train_id)
        run.lost.set()

    async def finish(self, job: TrainingJob, status: str, **values: Any) -> None:
        await self.db_call(
            training_queries.finish_training_job, job.id, worker_id=self.id, status=status, **values
        )

    async def settle(self, job: TrainingJob, result: Any, output_dir: Path | None = None) -> None:
        """Record how the run ended: done, cancelled, handed back (SIGTERM) or taken over."""
        if result.status == "completed":
            artifact = str(result.model_dir)
            if self.settings.artifact_store:
                try:
                    artifact = await asyncio.to_thread(
                        publish_model,
                        result.model_dir,
                        self.settings.artifact_store,
                        (output_dir or result.model_dir.parent).name,
                    )
                except Exception as exc:  # noqa: BLE001 - the store unreachable: a later attempt retries
                    log.exception("training job %d: the model could not be stored", job.id)
                    await self.db_call(
                        queue.fail,
                        queue.TRAINING,
                        worker_id=self.id,
                        id=job.id,
                        error=f"artifact store {self.settings.artifact_store}: {type(exc).__name__}: {exc}"[
                            :4000
                        ],
                        retryable=True,
                        max_attempts=self.settings.max_attempts,
                    )
                    return
            await self.finish(
                job,
                "succeeded",
                step=result.step,
                total_steps=result.total_steps,
                artifact_path=artifact,
                eval_before=result.eval_before,
                eval_after=result.eval_after,
            )
            log.info("training job %d succeeded: %s", job.id, artifact)
            await self.queue_automatic_evaluation(job)
        elif self.stop_requested.is_set():
            await self.db_call(queue.release, queue.TRAINING, worker_id=self.id, ids=[job.id])
            log.info(
                "training job %d handed back at step %d; it resumes from its checkpoint", job.id, result.step
            )
        else:
            row = await self.db_call(training_queries.get_training_job, job.id)
            if row.cancel_requested:
                await self.finish(job, "cancelled")
            log.info(
                "training job %d stopped at step %d (%s)",
                job.id,
                result.step,
                "cancelled" if row.cancel_requested else "lease lost",
            )

    # --- evaluation -------------------------------------------------------------------------

    async def queue_automatic_evaluation(self, job: TrainingJob) -> None:
        """Every finished job is evaluated unless its params say `evaluate: false`; a job that held
        out no pairs and names no prompts has nothing to compare on, and a reward model nothing to
        compare with (its held-out accuracy is its evaluation)."""
        params = TrainParams.model_validate(job.params)
        request = params.evaluation or EvaluationRequest()
        if not params.evaluate or params.objective == "reward_model":  # a reward model: eval_after
            return
        row = await self.db_call(training_queries.get_training_job, job.id)
        if request.prompts is None and not row.eval_pair_ids:
            log.info("training job %d: no held-out prompts, so no automatic evaluation", job.id)
            return
        evaluation = await self.db_call(evaluation_queries.create_evaluation, job.id, request)
        log.info("training job %d: evaluation %d queued", job.id, evaluation.id)

    async def evaluate(self, evaluation: Evaluation) -> None:
        """Reward accuracy on the external set (here, on torch), then the win-rate job for the
        generation workers; the comparisons are summed up when that job is done."""
        keeper = self.keeper(queue.EVALUATIONS)
        token = _Run()
        keeper.hold(evaluation.id, token)
        try:
            request = EvaluationRequest.model_validate(evaluation.request)
            job = await self.db_call(training_queries.get_training_job, evaluation.train_id)
            external = await self.external_accuracy(job, request) if request.external else None
            compare_job = await self.db_call(self.queue_comparisons, evaluation, job, request)
            done = await self.db_call(
                queue.finish,
                queue.EVALUATIONS,
                worker_id=self.id,
                id=evaluation.id,
                status="comparing",
                external=external,
                compare_job_id=compare_job.id,
            )
            if done:
                log.info("evaluation %d: comparing on job %d", evaluation.id, compare_job.id)
        except Exception as exc:  # noqa: BLE001 - reported on the evaluation
            log.exception("evaluation %d failed", evaluation.id)
            await self.db_call(
                queue.fail,
                queue.EVALUATIONS,
                worker_id=self.id,
                id=evaluation.id,
                error=f"{type(exc).__name__}: {exc}",
                retryable=not isinstance(exc, ValueError),
                max_attempts=self.settings.max_attempts,
            )
        finally:
            keeper.drop(evaluation.id, token)

    async def external_accuracy(self, job: TrainingJob, request: EvaluationRequest) -> dict[str, Any]:
        from workers.training.evaluation import external_reward_accuracy

        ids = await self.db_call(pair_queries.pair_ids, request.external)
        examples = await self.load_pairs(ids[: request.max_external_pairs])
        if not examples:
            raise ValueError(f"external: no pairs match {request.external.described()}")
        params = TrainParams.model_validate(job.params)
        trained = await asyncio.to_thread(
            resolve_model, f"train:{job.id}", self.settings, trained_path=job.artifact_path
        )
        base_name = job.base_model or self.settings.model
        base_path = await self.db_call(trained_model_path, base_name)
        base = await asyncio.to_thread(resolve_model, base_name, self.settings, trained_path=base_path)
        result = await asyncio.to_thread(
            external_reward_accuracy,
            trained=trained,
            base=base,
            beta=params.beta,
            examples=examples,
            max_length=params.max_length,
        )
        return result | {"filter": request.external.described()}

    def queue_comparisons(
        self, session: Any, evaluation: Evaluation, job: TrainingJob, request: EvaluationRequest
    ):
        """The win-rate job: held-out prompts (or the request's), the constitution whose comparison
        principles the judge asks, answers sampled as by default."""
        if request.prompts is not None:
            prompts = [[{"role": "user", "content": text}] for text in request.prompts[: request.max_prompts]]
        else:
            prompts = evaluation_queries.held_out_prompts(session, job, request.max_prompts)
        if not prompts:
            raise ValueError("no held-out prompts to compare on: give `prompts`")
        seen = prompts_in_training(prompts, training_queries.trained_prompts(session, job.id))
        name = request.constitution or job.dataset.get("constitution") or "harmless"
        constitution = ConstitutionStore(self.settings.constitutions_dir).get(name)
        version = constitution_queries.store_constitution_version(session, constitution)
        sampling = SamplingRequest(max_tokens=request.max_tokens, seed=evaluation.id).resolve(self.settings)
        compare_job = evaluation_queries.queue_comparison_job(
            session,
            evaluation=evaluation,
            train_job=job,
            prompts=prompts,
            constitution_version=version,
            baseline=job.base_model or self.settings.model,
            sampling=sampling,
            judge_model=self.settings.judge_model,
        )
        # How many of the prompts the trained model (or its base's lineage) learned from: 0 for the
        # default held-out prompts; given prompts that were trained on are listed (at most 50).
        in_training = {"n": len(seen), "prompts": [prompts[i] for i in seen[:50]]}
        compare_job.job_metadata = {**(compare_job.job_metadata or {}), "prompts_in_training": in_training}
        return compare_job

    async def settle_evaluations(self) -> None:
        for evaluation in await self.db_call(
            evaluation_queries.settle_evaluations, min_comparisons=self.settings.eval_min_comparisons
        ):
            log.info(
                "evaluation %d of training job %d: win rate %s, %s",
                evaluation.id,
                evaluation.train_id,
                evaluation.win_rate.get("rate") if evaluation.win_rate else None,
                (evaluation.promotion or {}).get("reason"),
            )

    # --- around the loop --------------------------------------------------------------------

    async def snapshot_pairs(self, job: TrainingJob, params: TrainParams) -> tuple[list[int], list[int]]:
        """The pairs a job trains on, fixed at its first start: later pairs never leak in."""
        if job.pair_ids is not None:
            return list(job.pair_ids), list(job.eval_pair_ids or [])
        pair_filter, selection = training_queries.dataset_selection(job)
        pairs = await self.db_call(pair_queries.pair_prompts, pair_filter, **selection)
        if not pairs:
            raise ValueError(f"dataset {job.dataset} matches no pairs")
        train_ids, eval_ids = split_train_eval(pairs, params.eval_fraction)
        await self.db_call(
            training_queries.update_training_job,
            job.id,
            worker_id=self.id,
            pair_ids=train_ids,
            eval_pair_ids=eval_ids,
        )
        return train_ids, eval_ids

    async def load_pairs(self, ids: list[int]) -> list[PairExample]:
        pairs = await self.db_call(pair_queries.pairs_by_ids, ids)
        return [PairExample(p.prompt, p.chosen, p.rejected, p.margin) for p in pairs]

    async def record_step(self, train_id: int, step: int, total: int, metrics: dict[str, float]) -> None:
        """Write the step's metrics; a database blip delays them to the next step, never stops training."""
        self.tokens_per_s = metrics.get("tokens_per_s", self.tokens_per_s)
        self.unsent_metrics.append((train_id, step, metrics))

        def write(session: Any) -> None:
            for unsent in self.unsent_metrics:
                training_queries.record_training_metrics(session, *unsent)
            training_queries.update_training_job(
                session, train_id, worker_id=self.id, step=step, total_steps=total
            )

        try:
            await self.db_call(write)
        except SQLAlchemyError as exc:
            log.warning("training job %d: metrics of step %d not written yet (%s)", train_id, step, exc)
            return
        self.unsent_metrics.clear()

    async def queue_automatic_jobs(self) -> None:
        for policy in await self.db_call(policy_queries.list_train_policies):
            job = await self.db_call(
                policy_queries.queue_policy_training,
                policy.constitution_name,
                default_model=self.settings.model,
            )
            if job is not None:
                log.info("policy %s queued training job %d", policy.constitution_name, job.id)

    async def sync_policies_from_settings(self) -> None:
        """Policies given in CAI_TRAIN_POLICIES are written to the database (the API can edit them)."""
        if not self.settings.train_policies:
            return
        for name, body in json.loads(self.settings.train_policies).items():
            policy = TrainPolicyIn.model_validate(body)
            await self.db_call(
                policy_queries.upsert_train_policy, constitution_name=name, **policy.db_values()
            )

    def status(self) -> dict[str, Any]:
        ranks = {"stats": {"ranks": self.ranks.world_size}} if self.ranks is not None else {}
        return self.base_status(
            model=None, in_flight=len(self.leases.held), tokens_per_s=round(self.tokens_per_s, 2), **ranks
        )


def main(settings: Settings, ranks: Ranks | None = None) -> int:
    """Run the worker until stopped; the exit code. Under torchrun this is rank 0 (`ranks`): the
    followers (`distributed.follow`) are told to stop when it does."""
    url = database_url(settings)
    worker = TrainingWorker(settings, get_engine(settings, pool_size=2), url=url, ranks=ranks)

    async def run() -> None:
        worker.install_signal_handlers()
        log.info(
            "training worker %s starting%s",
            worker.id,
            f" (leader of {ranks.world_size} ranks)" if ranks is not None else "",
        )
        await worker.run()

    started = time.monotonic()
    try:
        asyncio.run(run())
    finally:
        # Out of step (exit code 1), the followers may wait inside a collective: torchrun stops them.
        if ranks is not None and worker.exit_code == 0:
            from workers.training.distributed import stop_followers

            stop_followers(ranks)
    log.info("training worker ran %.0f s", time.monotonic() - started)
    return worker.exit_code
