"""Console sessions signed out before their expiry: a signed cookie cannot be recalled, so its
nonce is remembered here until the cookie would have expired anyway."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from cai_dpo.core.tables import RevokedSession


def revoke(session: Session, nonce: str, expires: float) -> None:
    """Sign a session out for good; expired revocations are pruned on the way."""
    now = datetime.now(UTC)
    session.execute(delete(RevokedSession).where(RevokedSession.expires_at < now))
    session.execute(
        insert(RevokedSession)
        .values(nonce=nonce, expires_at=datetime.fromtimestamp(expires, UTC))
        .on_conflict_do_nothing()
    )


def is_revoked(session: Session, nonce: str) -> bool:
    return session.scalar(select(RevokedSession.nonce).where(RevokedSession.nonce == nonce)) is not None
