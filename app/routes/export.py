"""`GET /export`: the dataset as TRL-ready JSONL or Parquet, streamed from a server-side cursor."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app import queries
from app.db import session_scope
from app.deps import Authorized
from app.export import export_row, in_split, jsonl_chunks, parquet_chunks
from app.routes.pairs import PairFilterDep

router = APIRouter(tags=["export"], dependencies=[Authorized])

_MEDIA_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


@router.get("/export")
def export(
    request: Request,
    filters: PairFilterDep,
    format: Literal["jsonl", "parquet"] = "jsonl",
    style: Literal["standard", "conversational"] = "conversational",
    split: Literal["train", "test", "all"] = "all",
    test_fraction: Annotated[float, Query(ge=0, le=1)] = 0.1,
    metadata: bool = False,
):
    engine = request.app.state.engine

    def rows():
        # The session lives as long as the stream: it is opened when the first chunk is asked for.
        with session_scope(engine) as session:
            for row in queries.stream_pairs(session, filters):
                if in_split(row.id, split, test_fraction):
                    yield export_row(row, style=style, metadata=metadata)

    chunks = (
        jsonl_chunks(rows()) if format == "jsonl" else parquet_chunks(rows(), style=style, metadata=metadata)
    )
    filename = f"pairs-{split}.{format}"
    return StreamingResponse(
        chunks,
        media_type=_MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
