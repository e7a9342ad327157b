"""audit log, who created each job, import idempotency, indexes for the hot paths

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("key_name", sa.Text(), nullable=True),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("ids", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
    )
    op.add_column("generation_jobs", sa.Column("created_by", sa.Text(), nullable=True))
    op.add_column("training_jobs", sa.Column("created_by", sa.Text(), nullable=True))
    op.add_column("dataset_imports", sa.Column("idempotency_key", sa.Text(), nullable=True))
    op.add_column("dataset_imports", sa.Column("request_hash", sa.String(64), nullable=True))
    op.create_unique_constraint("dataset_imports_idempotency_key_key", "dataset_imports", ["idempotency_key"])
    op.create_index("prompts_lease", "prompts", ["status", "lease_expires_at"])
    op.create_index("pairs_constitution_version", "pairs", ["constitution_version_id"])
    op.create_index("pairs_source", "pairs", ["source"])
    op.create_index("pairs_created_at", "pairs", ["created_at"])


def downgrade() -> None:
    op.drop_index("pairs_created_at", table_name="pairs")
    op.drop_index("pairs_source", table_name="pairs")
    op.drop_index("pairs_constitution_version", table_name="pairs")
    op.drop_index("prompts_lease", table_name="prompts")
    op.drop_constraint("dataset_imports_idempotency_key_key", "dataset_imports", type_="unique")
    op.drop_column("dataset_imports", "request_hash")
    op.drop_column("dataset_imports", "idempotency_key")
    op.drop_column("training_jobs", "created_by")
    op.drop_column("generation_jobs", "created_by")
    op.drop_table("audit_log")
