"""generation modes and scored pairs (job options; pair scores, preference, scorer, margin), and
indexes that let /metrics count without scanning whole tables

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "generation_jobs",
        sa.Column("options", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
    )
    op.add_column("pairs", sa.Column("scores", postgresql.JSONB(), nullable=True))
    op.add_column("pairs", sa.Column("preference", postgresql.JSONB(), nullable=True))
    op.add_column("pairs", sa.Column("scorer", sa.String(16), nullable=True))
    op.add_column("pairs", sa.Column("margin", sa.Float(), nullable=True))
    op.create_index("prompts_not_done", "prompts", ["status"], postgresql_where=sa.text("status <> 'done'"))
    op.create_index("pairs_flagged", "pairs", ["id"], postgresql_where=sa.text("flagged"))


def downgrade() -> None:
    op.drop_index("pairs_flagged", table_name="pairs")
    op.drop_index("prompts_not_done", table_name="prompts")
    op.drop_column("pairs", "margin")
    op.drop_column("pairs", "scorer")
    op.drop_column("pairs", "preference")
    op.drop_column("pairs", "scores")
    op.drop_column("generation_jobs", "options")
