"""human reviews of pairs (approve, reject, edit the chosen text), one row per version

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pair_reviews",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("pair_id", sa.BigInteger(), sa.ForeignKey("pairs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("chosen_text", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.Text(), nullable=False),
        sa.Column("latest", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.UniqueConstraint("pair_id", "version"),
        sa.CheckConstraint("status IN ('approved', 'rejected')", name="pair_reviews_status"),
    )
    op.create_index(
        "pair_reviews_latest", "pair_reviews", ["pair_id"], unique=True, postgresql_where=sa.text("latest")
    )
    op.create_index(
        "pair_reviews_latest_status",
        "pair_reviews",
        ["status", "pair_id"],
        postgresql_where=sa.text("latest"),
    )


def downgrade() -> None:
    op.drop_index("pair_reviews_latest_status", table_name="pair_reviews")
    op.drop_index("pair_reviews_latest", table_name="pair_reviews")
    op.drop_table("pair_reviews")
