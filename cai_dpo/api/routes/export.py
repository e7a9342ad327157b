"""`GET /export`: the dataset as TRL-ready JSONL or Parquet, streamed from a server-side cursor."""

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from cai_dpo.api.deps import Authorized
from cai_dpo.api.schemas import ExportQuery
from cai_dpo.core.db import session_scope
from cai_dpo.core.export_format import export_row, in_split, jsonl_chunks, parquet_chunks
from cai_dpo.core.queries import pairs as pair_queries

router = APIRouter(tags=["export"], dependencies=[Authorized])

_MEDIA_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


@router.get("/export")
def export(request: Request, query: Annotated[ExportQuery, Query()]):
    engine = request.app.state.engine
    filters = query.only_filter()

    def rows():
        # The session lives as long as the stream: it is opened when the first chunk is asked for.
        with session_scope(engine) as session:
            for row in pair_queries.stream_pairs(session, filters):
                if in_split(row.id, query.split, query.test_fraction):
                    yield export_row(row, style=query.style, metadata=query.metadata)

    if query.format == "jsonl":
        chunks = jsonl_chunks(rows())
    else:
        chunks = parquet_chunks(rows(), style=query.style, metadata=query.metadata)
    return StreamingResponse(
        chunks,
        media_type=_MEDIA_TYPES[query.format],
        headers={"Content-Disposition": f'attachment; filename="pairs-{query.split}.{query.format}"'},
    )
