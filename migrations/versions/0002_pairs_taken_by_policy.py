"""pairs remember the automatic training job that took them (replaces the policy id watermark)

An id watermark skips a pair whose transaction commits after one with a higher id (a long import
beside running workers): that pair was never counted by its policy. Marking each pair with the job
that took it counts every pair exactly once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("pairs", sa.Column("policy_train_id", sa.BigInteger(), nullable=True))
    op.create_foreign_key(
        "pairs_policy_train_id_fkey",
        "pairs",
        "training_jobs",
        ["policy_train_id"],
        ["id"],
        ondelete="SET NULL",
    )
    # Automatic jobs made under the watermark named their pairs by an id range: mark those pairs.
    op.execute("""
        UPDATE pairs p SET policy_train_id = t.id
        FROM training_jobs t
        WHERE t.policy IS NOT NULL AND t.policy = p.constitution_name AND NOT p.flagged
          AND p.id BETWEEN (t.dataset->>'min_id')::bigint AND (t.dataset->>'max_id')::bigint
    """)
    op.create_index(
        "pairs_untaken_by_policy",
        "pairs",
        ["constitution_name"],
        postgresql_where=sa.text("policy_train_id IS NULL AND NOT flagged"),
    )
    op.drop_column("train_policies", "last_pair_id")


def downgrade() -> None:
    op.add_column(
        "train_policies", sa.Column("last_pair_id", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.execute("""
        UPDATE train_policies tp
        SET last_pair_id = coalesce(
            (SELECT max(p.id) FROM pairs p
             WHERE p.constitution_name = tp.constitution_name AND p.policy_train_id IS NOT NULL), 0)
    """)
    op.drop_index("pairs_untaken_by_policy", table_name="pairs")
    op.drop_constraint("pairs_policy_train_id_fkey", "pairs", type_="foreignkey")
    op.drop_column("pairs", "policy_train_id")
