"""comparisons record both answers' lengths (the length-controlled win rate) and who judged them

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("comparisons", sa.Column("length_a", sa.Integer(), nullable=True))
    op.add_column("comparisons", sa.Column("length_b", sa.Integer(), nullable=True))
    op.add_column("comparisons", sa.Column("judges", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("comparisons", "judges")
    op.drop_column("comparisons", "length_b")
    op.drop_column("comparisons", "length_a")
