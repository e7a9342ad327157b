"""Automatic training policies: a training job each time enough new pairs exist."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core.pair_filter import PairFilter, pair_conditions
from cai_dpo.core.queries.pairs import count_pairs
from cai_dpo.core.queries.training import create_training_job
from cai_dpo.core.tables import Pair, TrainingJob, TrainPolicy


def upsert_train_policy(session: Session, *, constitution_name: str, **values: Any) -> TrainPolicy:
    stmt = insert(TrainPolicy).values(constitution_name=constitution_name, **values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["constitution_name"],
            set_={**{k: stmt.excluded[k] for k in values}, "updated_at": func.now()},
        )
    )
    return session.get(TrainPolicy, constitution_name, populate_existing=True)


def list_train_policies(session: Session) -> list[TrainPolicy]:
    return list(session.scalars(select(TrainPolicy).order_by(TrainPolicy.constitution_name)))


def get_train_policy(session: Session, name: str) -> TrainPolicy | None:
    return session.get(TrainPolicy, name)


def delete_train_policy(session: Session, name: str) -> bool:
    policy = session.get(TrainPolicy, name)
    if policy is None:
        return False
    session.delete(policy)
    return True


def policy_pairs_waiting(session: Session, constitution_name: str) -> int:
    """Unflagged pairs of the constitution that no automatic training job has taken yet."""
    return count_pairs(session, PairFilter(constitution=constitution_name), untaken_by_policy=True)


def queue_policy_training(session: Session, policy_name: str, *, default_model: str) -> TrainingJob | None:
    """Queue one automatic job once `min_new_pairs` untaken unflagged pairs exist; it takes them all.

    The policy row is locked for the count and the marking, so concurrent callers (API processes,
    workers) queue exactly one job for the same pairs. Each pair is marked with the job that took
    it, rather than compared with an id watermark: a pair whose transaction commits after one with
    a higher id (a long import beside running workers) is still counted next time.
    """
    policy = session.get(TrainPolicy, policy_name, with_for_update=True, populate_existing=True)
    if policy is None or not policy.enabled:
        return None
    dataset = PairFilter(constitution=policy.constitution_name)
    if count_pairs(session, dataset, untaken_by_policy=True) < policy.min_new_pairs:
        return None
    job = create_training_job(
        session,
        base_model=policy.base_model or default_model,
        dataset={},
        params=policy.params,
        policy=policy.constitution_name,
    )
    # The filter, and the mark that makes the job's dataset exactly the pairs it took.
    job.dataset = dataset.described() | {"policy_train_id": job.id}
    # Pairs committed since the count are taken too: the job's dataset is exactly the marked pairs.
    untaken = pair_conditions(dataset, untaken_by_policy=True)
    session.execute(update(Pair).where(*untaken).values(policy_train_id=job.id))
    return job
