"""Every database access of the service, as named functions over a SQLAlchemy session, one module
per resource. The queue's own statements (claim, renew, expire, release) live in `core.queue`."""

from cai_dpo.core.queries import audit, constitutions, evaluations, jobs, pairs, policies, training, workers

__all__ = ["audit", "constitutions", "evaluations", "jobs", "pairs", "policies", "training", "workers"]
