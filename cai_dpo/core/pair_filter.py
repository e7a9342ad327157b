"""Which pairs: the one filter behind `GET /pairs`, `GET /export`, a `/train` dataset and the CLI.

`PairFilter` is a pydantic model, so the same class is read from query parameters (FastAPI),
from a JSON body (`POST /train`'s `dataset`), from a training job's stored `dataset`, and from the
CLI's options; `pair_conditions` turns it into SQL.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from annotated_types import Interval
from pydantic import BeforeValidator, ConfigDict, Field
from sqlalchemy import ColumnElement, Select, and_, exists, select
from sqlalchemy.orm import aliased

from cai_dpo.core.generation_modes import ScorerKind
from cai_dpo.core.pair_flags import FLAGS
from cai_dpo.core.storable import StorableText
from cai_dpo.core.strict_json import StrictJson
from cai_dpo.core.tables import ConstitutionVersion, Pair, PairReview

# Row ids are PostgreSQL bigints, but an id is read exactly only up to 2**53 - 1 by a JSON client
# in JavaScript and by a JSON parser that reads `1.0`-style numbers as floats (and so does a fuzzer
# comparing bounds): no service of this size reaches it, and a larger number names no row.
DB_ID_MAX = 2**53 - 1
DbId = Annotated[int, Interval(ge=1, le=DB_ID_MAX)]

Review = Literal["approved", "rejected", "unreviewed", "any"]
FlagName = Literal[tuple(FLAGS)]  # type: ignore[valid-type]  # the flags the service sets


def iso_time(value: Any) -> Any:
    """An ISO 8601 date or date and time: not a number, which pydantic would read as Unix seconds
    (or milliseconds past 2e10)."""
    if isinstance(value, int | float) or (
        isinstance(value, str) and re.fullmatch(r"\s*[+-]?[\d.]+\s*", value)
    ):
        raise ValueError(
            "expected an ISO 8601 date or date and time, e.g. 2025-01-31 or 2025-01-31T12:00:00Z"
        )
    return value


IsoTime = Annotated[datetime, BeforeValidator(iso_time)]


class PairFilter(StrictJson):
    """Filters over stored pairs; every field optional, all given ones must hold."""

    model_config = ConfigDict(extra="forbid")

    job_id: DbId | None = Field(None, description="Pairs of this generation job.")
    constitution: StorableText | None = Field(None, max_length=64, description="Constitution name.")
    constitution_version: StorableText | None = Field(
        None, min_length=8, max_length=64, description="Content hash (or its first 8+ characters)."
    )
    since: IsoTime | None = Field(
        None,
        strict=False,  # an ISO 8601 string: JSON has no time type
        description="Pairs created at or after this time: ISO 8601, a date or a date and time.",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "string", "format": "date"},
                {"type": "null"},
            ]
        },
    )
    include_flagged: bool = Field(False, description="Include pairs carrying a quality flag.")
    flag: FlagName | None = Field(
        None,
        description="Only pairs carrying this quality flag (flagged pairs included whatever "
        "`include_flagged` says): " + ", ".join(FLAGS) + ".",
    )
    source: StorableText | None = Field(
        None, max_length=200, description="`generated`, or the source tag of an import."
    )
    import_id: DbId | None = Field(None, description="Pairs of this import.")
    scorer: ScorerKind | None = Field(None, description="Pairs a scorer of this kind judged.")
    min_margin: float | None = Field(
        None,
        ge=-1e6,
        le=1e6,
        description="Pairs the scorer preferred by at least this margin: log(p / (1 - p)) of the chosen "
        "answer (0: indifferent; 1: p = 0.73; 2: p = 0.88). Pairs no scorer judged are left out.",
    )
    min_length_ratio: float | None = Field(
        None,
        ge=0,
        le=1e6,
        description="Pairs whose chosen answer has at least this many times the characters of the "
        "rejected one (`length_ratio`).",
    )
    max_length_ratio: float | None = Field(
        None,
        ge=0,
        le=1e6,
        description="Pairs whose chosen answer has at most this many times the characters of the "
        "rejected one (`length_ratio`; 1.5: at most half as long again). Judges favour longer answers, "
        "so a cap keeps pairs that teach length out. Pairs with an empty rejected answer are left out.",
    )
    review: Review = Field(
        "any",
        description="Human review: `approved` or `rejected` (by the latest review of the pair), "
        "`unreviewed` (never reviewed), `any`. An edited pair's export uses the latest edit as chosen.",
    )

    def only_filter(self) -> PairFilter:
        """The filter part of a subclass that adds a route's own parameters (paging, format)."""
        return PairFilter.model_validate(self.model_dump(include=set(PairFilter.model_fields)))

    def described(self) -> dict[str, Any]:
        """The fields that were set, for messages and stored datasets."""
        return self.model_dump(mode="json", exclude_defaults=True)


def pair_conditions(
    f: PairFilter,
    *,
    ids: list[int] | None = None,
    taken_by_policy_job: int | None = None,
    untaken_by_policy: bool = False,
) -> list[ColumnElement[bool]]:
    """SQL conditions of a filter, plus the service's own selections (never query parameters):
    explicit ids, the pairs an automatic training job took, or those no automatic job took yet."""
    conditions: list[ColumnElement[bool]] = []
    if f.job_id is not None:
        conditions.append(Pair.job_id == f.job_id)
    if f.constitution is not None:
        conditions.append(Pair.constitution_name == f.constitution)
    if f.constitution_version is not None:  # the full hash or a prefix of it, as git takes
        versions = select(ConstitutionVersion.id).where(
            ConstitutionVersion.content_hash.startswith(f.constitution_version, autoescape=True)
        )
        conditions.append(Pair.constitution_version_id.in_(versions))
    if f.since is not None:
        conditions.append(Pair.created_at >= f.since)
    if f.flag is not None:
        conditions.append(Pair.flags.any(f.flag))
    elif not f.include_flagged:
        conditions.append(Pair.flagged.is_(False))
    if f.source is not None:
        conditions.append(Pair.source == f.source)
    if f.import_id is not None:
        conditions.append(Pair.import_id == f.import_id)
    if f.scorer is not None:
        conditions.append(Pair.scorer == f.scorer)
    if f.min_margin is not None:
        conditions.append(Pair.margin >= f.min_margin)
    if f.min_length_ratio is not None:
        conditions.append(Pair.length_ratio >= f.min_length_ratio)
    if f.max_length_ratio is not None:
        conditions.append(Pair.length_ratio <= f.max_length_ratio)
    if f.review != "any":
        # An alias of its own: a query that joins the latest review itself (the export) stays apart.
        reviews = aliased(PairReview, name="filter_reviews")
        if f.review == "unreviewed":
            conditions.append(~exists().where(reviews.pair_id == Pair.id))
        else:
            reviewed = select(reviews.pair_id).where(reviews.latest, reviews.status == f.review)
            conditions.append(Pair.id.in_(reviewed))
    if ids is not None:
        conditions.append(Pair.id.in_(ids))
    if taken_by_policy_job is not None:
        conditions.append(Pair.policy_train_id == taken_by_policy_job)
    if untaken_by_policy:
        conditions.append(Pair.policy_train_id.is_(None))
    return conditions


def filtered(stmt: Select, f: PairFilter, **selection: Any) -> Select:
    conditions = pair_conditions(f, **selection)
    return stmt.where(and_(*conditions)) if conditions else stmt
