"""Alembic migrations of the cai-dpo schema."""
