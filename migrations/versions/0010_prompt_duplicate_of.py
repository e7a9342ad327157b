"""prompts record the earlier prompt of their job they near-duplicate

`duplicate_of` is the position of the first prompt of the job with the same normalised text or
a word 3-gram Jaccard similarity of 0.7 or more (MinHash, `cai_dpo.core.dedup`), set when the job
is created; the pair of such a prompt is flagged `duplicate_prompt`. Existing prompts stay NULL.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("prompts", sa.Column("duplicate_of", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("prompts", "duplicate_of")
