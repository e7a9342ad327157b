"""pairs record the length ratio of chosen to rejected (characters), derived by PostgreSQL

Judges favour longer answers: a pair whose revision is much longer than the first answer may
teach length, not quality. `length_ratio` = char_length(chosen) / char_length(rejected) (NULL
where rejected is empty) is a stored generated column, so it can never disagree with the texts,
covers imported pairs too, and fills itself for existing rows (the table is rewritten once).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LENGTH_RATIO = "char_length(chosen)::double precision / NULLIF(char_length(rejected), 0)"


def upgrade() -> None:
    op.add_column(
        "pairs",
        sa.Column("length_ratio", sa.Float(), sa.Computed(LENGTH_RATIO, persisted=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("pairs", "length_ratio")
