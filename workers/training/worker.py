"""The training worker: claim a training job, snapshot its pairs, run DPO, publish the model.

Jobs are claimed under a lease like prompts; a thread renews it while the trainer runs. The
trainer checkpoints every N steps into the job's folder, so a job whose worker died resumes
from its last checkpoint on the next worker that claims it. Idle, the worker also applies the
automatic training policies (one job per batch of new pairs, whatever the number of processes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Engine as DBEngine
from sqlalchemy.exc import SQLAlchemyError

from app import queries
from app.db import database_url, get_engine, libpq_url, run_in_session, session_scope
from app.export import split_of
from app.models import TrainingJob
from app.settings import Settings
from workers.models import resolve_model, trained_model_path, training_output_dir
from workers.training.config import TrainParams
from workers.training.data import PairExample

log = logging.getLogger(__name__)


def dataset_filter(dataset: dict[str, Any]) -> queries.PairFilter:
    """The `/export` filters a training job's `dataset` holds, as a query filter."""
    return queries.PairFilter(
        **{k: v for k, v in dataset.items() if k in queries.PairFilter.__dataclass_fields__}
    )


def split_train_eval(pair_ids: list[int], eval_fraction: float) -> tuple[list[int], list[int]]:
    """Held-out pairs are the export's `test` split at the same fraction: one notion of held out."""
    evals = [i for i in pair_ids if split_of(i, eval_fraction) == "test"]
    held = set(evals)
    return [i for i in pair_ids if i not in held], evals


@dataclass
class Lease:
    """Renews a training job's lease in a thread; `lost` is set when the job is no longer ours."""

    worker: TrainingWorker
    train_id: int
    lost: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Lease:
        self.thread = threading.Thread(target=self._renew, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _renew(self) -> None:
        settings = self.worker.settings
        while not self.done.wait(settings.lease_seconds / 3):
            try:
                with session_scope(self.worker.db) as session:
                    held = queries.renew_training_lease(
                        session,
                        worker_id=self.worker.id,
                        train_id=self.train_id,
                        lease_seconds=settings.lease_seconds,
                    )
                    queries.record_worker_heartbeat(session, **self.worker.status(in_flight=1))
            except Exception:  # noqa: BLE001 - a blip must not kill the renewals
                log.exception("lease renewal failed")
                continue
            if not held:
                self.lost.set()
                return


class TrainingWorker:
    def __init__(self, settings: Settings, db: DBEngine, *, url: str):
        self.settings = settings
        self.db = db
        self.url = url
        self.id = f"train-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self.tokens_per_s = 0.0
        self.unsent_metrics: list[tuple[int, int, dict[str, float]]] = []

    def run(self) -> None:
        self.sync_policies_from_settings()
        while not self.stopping.is_set():
            try:
                self.serve_jobs()
            except (SQLAlchemyError, psycopg.Error) as exc:  # the database restarting: reconnect
                log.warning("database unavailable (%s); retrying after the poll interval", exc)
                self.stopping.wait(self.settings.poll_seconds)
        self.call(queries.mark_worker_stopped, self.id)
        log.info("training worker %s stopped", self.id)

    def serve_jobs(self) -> None:
        """Claim and train jobs until stopped; idle, wait for a NOTIFY or the poll interval."""
        with psycopg.connect(libpq_url(self.url), autocommit=True) as listener:
            listener.execute(f"LISTEN {queries.TRAINING_CHANNEL}")
            while not self.stopping.is_set():
                self.call(queries.record_worker_heartbeat, **self.status(in_flight=0))
                self.queue_automatic_jobs()
                job = self.call(
                    queries.claim_training_job,
                    worker_id=self.id,
                    lease_seconds=self.settings.lease_seconds,
                    max_attempts=self.settings.max_attempts,
                )
                if job is not None:
                    self.train(job)
                    continue
                for _ in listener.notifies(timeout=self.settings.poll_seconds, stop_after=1):
                    pass

    def train(self, job: TrainingJob) -> None:
        from workers.training.trainer import TrainHooks, run_training

        params = TrainParams.model_validate(job.params)
        log.info("training job %d: claimed (attempt %d)", job.id, job.attempts)
        try:
            train_ids, eval_ids = self.snapshot_pairs(job, params)
            train_pairs, eval_pairs = self.load_pairs(train_ids), self.load_pairs(eval_ids)
            base = job.base_model or self.settings.model
            model_path = resolve_model(base, self.settings, trained_path=self.call(trained_model_path, base))
        except Exception as exc:  # noqa: BLE001 - reported on the job
            log.exception("training job %d cannot start", job.id)
            self.call(
                queries.finish_training_job, job.id, worker_id=self.id, status="failed", error=str(exc)[:4000]
            )
            return
        output_dir = training_output_dir(self.settings.artifacts_dir, job.id, job.created_at)
        with Lease(self, job.id) as lease:
            hooks = TrainHooks(
                on_step=lambda step, total, metrics: self.record_step(job.id, step, total, metrics),
                on_eval=lambda when, metrics: self.call(
                    queries.update_training_job, job.id, worker_id=self.id, **{f"eval_{when}": metrics}
                ),
                on_checkpoint=lambda step, path: log.info(
                    "training job %d: checkpoint at step %d", job.id, step
                ),
                should_stop=lambda: self.stopping.is_set() or lease.lost.is_set(),
            )
            try:
                result = run_training(
                    params,
                    model_path=model_path,
                    train_pairs=train_pairs,
                    eval_pairs=eval_pairs,
                    output_dir=output_dir,
                    hooks=hooks,
                    checkpoint_steps=self.settings.checkpoint_steps,
                )
            except Exception as exc:  # noqa: BLE001 - reported on the job
                log.exception("training job %d failed", job.id)
                self.call(
                    queries.finish_training_job,
                    job.id,
                    worker_id=self.id,
                    status="failed",
                    error=f"{type(exc).__name__}: {exc}"[:4000],
                )
                return
        self.settle(job, result, lease)

    def settle(self, job: TrainingJob, result, lease: Lease) -> None:
        """Record how the run ended: done, cancelled, handed back (SIGTERM) or taken over."""
        if result.status == "completed":
            self.call(
                queries.finish_training_job,
                job.id,
                worker_id=self.id,
                status="succeeded",
                step=result.step,
                total_steps=result.total_steps,
                artifact_path=str(result.model_dir),
                eval_before=result.eval_before,
                eval_after=result.eval_after,
            )
            log.info("training job %d succeeded: %s", job.id, result.model_dir)
        elif self.stopping.is_set():
            self.call(queries.release_training_job, worker_id=self.id, train_id=job.id)
            log.info(
                "training job %d handed back at step %d; it resumes from its checkpoint", job.id, result.step
            )
        else:
            cancelled = self.call(queries.get_training_job, job.id).cancel_requested
            if cancelled:
                self.call(queries.finish_training_job, job.id, worker_id=self.id, status="cancelled")
            log.info(
                "training job %d stopped at step %d (%s)",
                job.id,
                result.step,
                "cancelled" if cancelled else "lease lost",
            )

    def snapshot_pairs(self, job: TrainingJob, params: TrainParams) -> tuple[list[int], list[int]]:
        """The pairs a job trains on, fixed at its first start: later pairs never leak in."""
        if job.pair_ids is None:
            ids = self.call(queries.pair_ids, dataset_filter(job.dataset))
            if not ids:
                raise ValueError(f"dataset {job.dataset} matches no pairs")
            train_ids, eval_ids = split_train_eval(ids, params.eval_fraction)
            self.call(
                queries.update_training_job,
                job.id,
                worker_id=self.id,
                pair_ids=train_ids,
                eval_pair_ids=eval_ids,
            )
            return train_ids, eval_ids
        return list(job.pair_ids), list(job.eval_pair_ids or [])

    def load_pairs(self, ids: list[int]) -> list[PairExample]:
        pairs = self.call(queries.pairs_by_ids, ids)
        return [PairExample(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected) for p in pairs]

    def record_step(self, train_id: int, step: int, total: int, metrics: dict[str, float]) -> None:
        """Write the step's metrics; a database blip delays them to the next step, never stops training."""
        self.tokens_per_s = metrics.get("tokens_per_s", self.tokens_per_s)
        self.unsent_metrics.append((train_id, step, metrics))

        def write(session):
            for unsent in self.unsent_metrics:
                queries.record_training_metrics(session, *unsent)
            queries.update_training_job(session, train_id, worker_id=self.id, step=step, total_steps=total)

        try:
            self.call(write)
        except SQLAlchemyError as exc:
            log.warning("training job %d: metrics of step %d not written yet (%s)", train_id, step, exc)
            return
        self.unsent_metrics.clear()

    def queue_automatic_jobs(self) -> None:
        for policy in self.call(queries.list_train_policies):
            job = self.call(
                queries.queue_policy_training, policy.constitution_name, default_model=self.settings.model
            )
            if job is not None:
                log.info("policy %s queued training job %d", policy.constitution_name, job.id)

    def sync_policies_from_settings(self) -> None:
        """Policies given in CAI_TRAIN_POLICIES are written to the database (the API can edit them)."""
        if not self.settings.train_policies:
            return
        from app.schemas import TrainPolicyIn

        for name, body in json.loads(self.settings.train_policies).items():
            policy = TrainPolicyIn.model_validate(body)
            self.call(queries.upsert_train_policy, constitution_name=name, **policy.db_values())

    def status(self, *, in_flight: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "train",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "model": None,
            "in_flight": in_flight,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "stats": {},
        }

    def call(self, fn, *args, **kwargs):
        return run_in_session(self.db, fn, *args, **kwargs)


def main(settings: Settings) -> int:
    url = database_url(settings)
    worker = TrainingWorker(settings, get_engine(settings, pool_size=2), url=url)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    log.info("training worker %s starting", worker.id)
    started = time.monotonic()
    worker.run()
    log.info("training worker ran %.0f s", time.monotonic() - started)
    return 0
