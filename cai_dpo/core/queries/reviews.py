"""Human reviews of pairs: add a version, read a pair's history, and the latest state of many.

A review never changes the pair. Each version is the whole review state (status and the chosen
text in force), so the `latest` row alone answers "is it approved, and with which text".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cai_dpo.core.tables import Pair, PairReview

ReviewStatus = Literal["approved", "rejected"]


def add_review(
    session: Session, pair: Pair, *, status: ReviewStatus, reviewer: str, chosen: str | None = None
) -> PairReview:
    """A new version of the pair's review. `chosen` edits the chosen text (the generated text
    again undoes earlier edits); without it the text in force stays.

    The pair's row is locked for the transaction, so concurrent reviews of one pair queue up and
    each gets the next version number.
    """
    session.execute(select(Pair.id).where(Pair.id == pair.id).with_for_update(key_share=True))
    previous = session.scalars(
        select(PairReview).where(PairReview.pair_id == pair.id, PairReview.latest)
    ).one_or_none()
    if chosen is not None:
        chosen_text = None if chosen == pair.chosen else chosen
    else:
        chosen_text = previous.chosen_text if previous else None
    if previous is not None:
        session.execute(update(PairReview).where(PairReview.id == previous.id).values(latest=False))
    review = PairReview(
        pair_id=pair.id,
        version=(previous.version if previous else 0) + 1,
        status=status,
        chosen_text=chosen_text,
        reviewer=reviewer,
        latest=True,
    )
    session.add(review)
    session.flush()
    session.refresh(review)
    return review


def reviews_of(session: Session, pair_id: int) -> list[PairReview]:
    """Every version of the pair's review, oldest first."""
    return list(
        session.scalars(select(PairReview).where(PairReview.pair_id == pair_id).order_by(PairReview.version))
    )


def latest_reviews(session: Session, pair_ids: Sequence[int]) -> dict[int, PairReview]:
    """The latest review of each of these pairs that has one."""
    if not pair_ids:
        return {}
    rows = session.scalars(select(PairReview).where(PairReview.pair_id.in_(pair_ids), PairReview.latest))
    return {review.pair_id: review for review in rows}


def review_out(review: PairReview, previous: PairReview | None) -> dict:
    """A version as the API and the console show it; `edited`: this version changed the text."""
    return {
        "version": review.version,
        "status": review.status,
        "reviewer": review.reviewer,
        "created_at": review.created_at,
        "chosen": review.chosen_text,
        "edited": review.chosen_text != (previous.chosen_text if previous else None),
    }


def history(session: Session, pair_id: int) -> list[dict]:
    """`review_out` of every version, oldest first."""
    reviews = reviews_of(session, pair_id)
    return [review_out(r, reviews[i - 1] if i else None) for i, r in enumerate(reviews)]
