"""SQLAlchemy models: the whole schema of the service (Alembic migrations mirror it).

Postgres is both the store and the queue: a `Prompt` row is a generation task and a
`TrainingJob` row a training task, each claimed under a lease (`lease_owner`, `lease_expires_at`).
A `Pair` is unique per prompt, so a prompt retried after a crash never yields two pairs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, datetime: DateTime(timezone=True)}


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class ConstitutionVersion(Base):
    """Every constitution text ever used, by content hash, so each pair points at its exact text."""

    __tablename__ = "constitution_versions"
    __table_args__ = (UniqueConstraint("name", "content_hash"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    body: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _now()


class GenerationJob(Base):
    __tablename__ = "generation_jobs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    constitution_version_id: Mapped[int] = mapped_column(ForeignKey("constitution_versions.id"))
    constitution_name: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(Text)
    revisions: Mapped[int] = mapped_column(Integer)
    sampling: Mapped[dict[str, Any]]
    # `GenerationMode`: mode (revise | ai_feedback | best_of_n), n, scorer, verify.
    options: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    job_metadata: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, server_default=text("'{}'::jsonb")
    )
    n_prompts: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # The name of the API key that submitted it: a `generate` key may cancel and retry its own jobs.
    created_by: Mapped[str | None] = mapped_column(Text)
    cancelled_at: Mapped[datetime | None]
    # Why the job stopped before its prompts ran out, where the service stopped it (its budget);
    # NULL for a job that ran out or that a caller cancelled.
    stop_reason: Mapped[str | None] = mapped_column(Text)
    # The budget: once the job's pairs have generated this many tokens its unclaimed prompts are
    # cancelled (`complete_prompts`).
    max_generated_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # Its pairs' usage summed as they are written (`complete_prompts`, one statement per batch):
    # the budget is checked against them, and /jobs reads them without summing every pair.
    generated_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    engine_seconds: Mapped[float] = mapped_column(Float, server_default="0")
    created_at: Mapped[datetime] = _now()


class Prompt(Base):
    """A generation task: `queued -> running -> done | failed`, or `cancelled` with its job."""

    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("job_id", "position"),
        # The claim scans only claimable rows, whatever the size of the history.
        Index("prompts_claimable", "id", postgresql_where=text("status IN ('queued', 'running')")),
        Index("prompts_job_status", "job_id", "status"),
        # Expiry scans only the running rows, by when their lease runs out.
        Index("prompts_lease", "status", "lease_expires_at"),
        # /metrics counts the prompts not done through this; the done ones are the rest.
        Index("prompts_not_done", "status", postgresql_where=text("status <> 'done'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("generation_jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    messages: Mapped[list[Any]]
    # The position of the first prompt of the job that this one near-duplicates (`dedup`), NULL for
    # a first occurrence: its pair is flagged `duplicate_prompt`.
    duplicate_of: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class DatasetImport(Base):
    __tablename__ = "dataset_imports"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    n_pairs: Mapped[int] = mapped_column(Integer)
    # A retried upload with the same key returns this import instead of adding its pairs again.
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()


class Pair(Base):
    """One preference pair: rejected = the initial answer, chosen = the final revision."""

    __tablename__ = "pairs"
    __table_args__ = (
        Index("pairs_constitution_id", "constitution_name", "id"),
        Index("pairs_constitution_version", "constitution_version_id"),
        Index("pairs_source", "source"),
        Index("pairs_created_at", "created_at"),
        Index("pairs_flagged", "id", postgresql_where=text("flagged")),
        # What the automatic training policies count: pairs no automatic job has taken yet.
        Index(
            "pairs_untaken_by_policy",
            "constitution_name",
            postgresql_where=text("policy_train_id IS NULL AND NOT flagged"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), unique=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("generation_jobs.id", ondelete="CASCADE"), index=True
    )
    import_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_imports.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(Text, server_default="generated")
    constitution_name: Mapped[str | None] = mapped_column(String(64))
    constitution_version_id: Mapped[int | None] = mapped_column(ForeignKey("constitution_versions.id"))
    prompt: Mapped[list[Any]]
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    trajectory: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    flags: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    # Derived by Postgres so that it can never disagree with `flags`.
    flagged: Mapped[bool] = mapped_column(Boolean, Computed("cardinality(flags) > 0", persisted=True))
    model: Mapped[str | None] = mapped_column(Text)
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Where a scorer judged the pair: {"chosen": float, "rejected": float} (scoring scorers only),
    # the preference ({"p_chosen", "scorer", "model", "principles", "orders"}), the scorer's kind,
    # and the margin: log(p_chosen / (1 - p_chosen)), the Bradley-Terry reward difference.
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    preference: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    scorer: Mapped[str | None] = mapped_column(String(16))
    margin: Mapped[float | None] = mapped_column(Float)
    # Characters of chosen over characters of rejected (NULL where rejected is empty), derived by
    # Postgres: judges favour longer answers, and `max_length_ratio` caps what a pair teaches by it.
    length_ratio: Mapped[float | None] = mapped_column(
        Float,
        Computed("char_length(chosen)::double precision / NULLIF(char_length(rejected), 0)", persisted=True),
    )
    pair_metadata: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, server_default=text("'{}'::jsonb")
    )
    # The automatic training job that took this pair (a policy uses each pair once).
    policy_train_id: Mapped[int | None] = mapped_column(ForeignKey("training_jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _now()


class PairReview(Base):
    """A human review of a pair, one row per version: approved or rejected, by whom and when.

    Reviews never touch the pair: the generated `chosen` stays as it was, and an edit of it is a
    version whose `chosen_text` is the reviewer's text. Each version is the whole review state:
    a later approve or reject carries the text in force forward, so the `latest` version says
    both the status and the chosen text that exports use (NULL: the generated one).
    """

    __tablename__ = "pair_reviews"
    __table_args__ = (
        UniqueConstraint("pair_id", "version"),
        CheckConstraint("status IN ('approved', 'rejected')", name="pair_reviews_status"),
        # One latest version per pair; `review=approved|rejected` reads through it.
        Index("pair_reviews_latest", "pair_id", unique=True, postgresql_where=text("latest")),
        Index("pair_reviews_latest_status", "status", "pair_id", postgresql_where=text("latest")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    chosen_text: Mapped[str | None] = mapped_column(Text)
    # The name of the API key that reviewed (`local` in loopback mode).
    reviewer: Mapped[str] = mapped_column(Text)
    latest: Mapped[bool] = mapped_column(Boolean, server_default="true")
    created_at: Mapped[datetime] = _now()


class TrainingJob(Base):
    """A training task, claimed under a lease like a prompt; resumable from its checkpoint."""

    __tablename__ = "training_jobs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), server_default="queued")
    base_model: Mapped[str] = mapped_column(Text)
    dataset: Mapped[dict[str, Any]]
    params: Mapped[dict[str, Any]]
    policy: Mapped[str | None] = mapped_column(String(64), index=True)
    pair_ids: Mapped[list[int] | None] = mapped_column(ARRAY(BigInteger))
    eval_pair_ids: Mapped[list[int] | None] = mapped_column(ARRAY(BigInteger))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer, server_default="0")
    total_steps: Mapped[int | None] = mapped_column(Integer)
    eval_before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    eval_after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    artifact_path: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default="false")
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    @property
    def trains_reward_model(self) -> bool:
        """Whether its model is a reward model (objective reward_model): it scores, and generates
        nothing to judge or serve."""
        return (self.params or {}).get("objective") == "reward_model"


class TrainingMetric(Base):
    __tablename__ = "training_metrics"

    train_id: Mapped[int] = mapped_column(
        ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    values: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _now()


class TrainPolicy(Base):
    """Automatic training for a constitution: queue a job once `min_new_pairs` new pairs exist."""

    __tablename__ = "train_policies"

    constitution_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    min_new_pairs: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]]
    base_model: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, server_default="true")
    # After each automatic job's evaluation, make its model the constitution's default when the win
    # rate's lower 95% bound is above 0.5.
    promote: Mapped[bool] = mapped_column(Boolean, server_default="false")
    updated_at: Mapped[datetime] = _now()


class Evaluation(Base):
    """An evaluation of a trained model, leased work of the training workers (`queue.EVALUATIONS`):
    they measure reward accuracy on an imported set and queue the win-rate comparison job; the
    job's comparisons are summed up when it finishes (`status`: queued -> running -> comparing ->
    done | failed)."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    train_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), server_default="queued")
    request: Mapped[dict[str, Any]]
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    compare_job_id: Mapped[int | None] = mapped_column(ForeignKey("generation_jobs.id", ondelete="SET NULL"))
    external: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    win_rate: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    promotion: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Comparison(Base):
    """One held-out prompt of an evaluation: both models' answers and the judge's preference."""

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), unique=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("generation_jobs.id", ondelete="CASCADE"), index=True)
    model_a: Mapped[str] = mapped_column(Text)
    model_b: Mapped[str] = mapped_column(Text)
    answer_a: Mapped[str] = mapped_column(Text)
    answer_b: Mapped[str] = mapped_column(Text)
    # P(answer_a preferred), the judge's ensemble over principles and both orders (a panel's:
    # the mean over its judges).
    p_a: Mapped[float] = mapped_column(Float)
    preference: Mapped[dict[str, Any]]
    # The answers' lengths in characters (the length-controlled win rate); None before 0008.
    length_a: Mapped[int | None] = mapped_column(Integer)
    length_b: Mapped[int | None] = mapped_column(Integer)
    # Who judged: [{"model": ..., "p_a": ...}] per judge of the panel; None before 0008.
    judges: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


class Promotion(Base):
    """A constitution's default generation model, set by an evaluation that cleared the gate."""

    __tablename__ = "promotions"

    constitution_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(Text)
    train_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    evaluation_id: Mapped[int | None] = mapped_column(ForeignKey("evaluations.id", ondelete="SET NULL"))
    reason: Mapped[str] = mapped_column(Text)
    promoted_at: Mapped[datetime] = _now()


class Worker(Base):
    """A live worker process, as last reported by its heartbeat."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(Text)
    in_flight: Mapped[int] = mapped_column(Integer, server_default="0")
    tokens_per_s: Mapped[float] = mapped_column(Float, server_default="0")
    stats: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    started_at: Mapped[datetime] = _now()
    heartbeat_at: Mapped[datetime] = _now()
    stopped_at: Mapped[datetime | None]


class AuditEntry(Base):
    """One mutating API call, allowed or refused: who, what, on which ids, with what outcome."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = _now()
    key_name: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(8))
    route: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    ids: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


class RevokedSession(Base):
    """A console session signed out before it expired; kept until it would have expired anyway."""

    __tablename__ = "revoked_sessions"
    __table_args__ = (Index("revoked_sessions_expires_at", "expires_at"),)

    nonce: Mapped[str] = mapped_column(Text, primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
