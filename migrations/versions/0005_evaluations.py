"""evaluations of trained models (leased work), their comparisons, promotions, and the policy gate

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOW = sa.text("now()")


def upgrade() -> None:
    op.add_column(
        "train_policies", sa.Column("promote", sa.Boolean(), server_default="false", nullable=False)
    )
    op.create_table(
        "evaluations",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column(
            "train_id", sa.BigInteger(), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("request", postgresql.JSONB(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "compare_job_id",
            sa.BigInteger(),
            sa.ForeignKey("generation_jobs.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("external", postgresql.JSONB(), nullable=True),
        sa.Column("win_rate", postgresql.JSONB(), nullable=True),
        sa.Column("promotion", postgresql.JSONB(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_NOW, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(op.f("ix_evaluations_train_id"), "evaluations", ["train_id"])
    op.create_table(
        "comparisons",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column(
            "prompt_id", sa.BigInteger(), sa.ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "job_id", sa.BigInteger(), sa.ForeignKey("generation_jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("model_a", sa.Text(), nullable=False),
        sa.Column("model_b", sa.Text(), nullable=False),
        sa.Column("answer_a", sa.Text(), nullable=False),
        sa.Column("answer_b", sa.Text(), nullable=False),
        sa.Column("p_a", sa.Float(), nullable=False),
        sa.Column("preference", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_NOW, nullable=False),
        sa.UniqueConstraint("prompt_id"),
    )
    op.create_index(op.f("ix_comparisons_job_id"), "comparisons", ["job_id"])
    op.create_table(
        "promotions",
        sa.Column("constitution_name", sa.String(64), primary_key=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column(
            "train_id", sa.BigInteger(), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "evaluation_id",
            sa.BigInteger(),
            sa.ForeignKey("evaluations.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), server_default=_NOW, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("promotions")
    op.drop_index(op.f("ix_comparisons_job_id"), table_name="comparisons")
    op.drop_table("comparisons")
    op.drop_index(op.f("ix_evaluations_train_id"), table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_column("train_policies", "promote")
