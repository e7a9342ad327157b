"""generation jobs record their usage and may carry a budget of generated tokens

`generated_tokens`, `prompt_tokens` and `engine_seconds` are the job's pairs' `usage` summed as the
workers write them; existing jobs get their pairs' sums here (pairs written before this revision
recorded no engine seconds: theirs count 0). `max_generated_tokens` is the job's budget: once its
pairs have generated that many tokens its unclaimed prompts are cancelled and `stop_reason` says
why. Existing jobs have no budget.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

USAGE_COLUMNS = ("generated_tokens", "prompt_tokens", "engine_seconds")


def upgrade() -> None:
    op.add_column("generation_jobs", sa.Column("stop_reason", sa.Text(), nullable=True))
    op.add_column("generation_jobs", sa.Column("max_generated_tokens", sa.BigInteger(), nullable=True))
    for name in ("generated_tokens", "prompt_tokens"):
        op.add_column("generation_jobs", sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))
    op.add_column(
        "generation_jobs", sa.Column("engine_seconds", sa.Float(), server_default="0", nullable=False)
    )
    op.execute("""
        UPDATE generation_jobs j
        SET generated_tokens = u.generated_tokens, prompt_tokens = u.prompt_tokens,
            engine_seconds = u.engine_seconds
        FROM (
            SELECT job_id,
                   sum(coalesce((usage->>'completion_tokens')::bigint, 0)) AS generated_tokens,
                   sum(coalesce((usage->>'prompt_tokens')::bigint, 0)) AS prompt_tokens,
                   sum(coalesce((usage->>'engine_seconds')::double precision, 0)) AS engine_seconds
            FROM pairs WHERE job_id IS NOT NULL AND usage IS NOT NULL GROUP BY job_id
        ) u
        WHERE j.id = u.job_id
    """)


def downgrade() -> None:
    for name in (*USAGE_COLUMNS, "max_generated_tokens", "stop_reason"):
        op.drop_column("generation_jobs", name)
