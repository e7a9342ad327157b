"""`GET /export`: the dataset as TRL-ready JSONL or Parquet, streamed from a server-side cursor."""

import threading
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from app.access import access
from app.openapi import errors
from app.schemas import ExportQuery
from cai_dpo.core.db import session_scope
from cai_dpo.core.export_format import export_row, in_split, jsonl_chunks, parquet_chunks
from cai_dpo.core.queries import pairs as pair_queries

router = APIRouter(tags=["export"])

# What a refused export is told to wait: an export of a few thousand pairs takes about this long.
EXPORT_RETRY_AFTER_S = 5
_MEDIA_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The pairs: JSON Lines (one TRL row per line) or a Parquet file.",
            "content": {media_type: {"schema": {"type": "string"}} for media_type in _MEDIA_TYPES.values()},
        },
        **errors(429),
    },
)
@access("read")
def export(request: Request, query: Annotated[ExportQuery, Query()]):
    """Streams from a pool of its own (`CAI_EXPORT_CONCURRENCY` connections), so slow readers never
    take the connections the rest of the API needs. With every slot taken the answer is an
    immediate 429 with `Retry-After`: a request waiting for a slot would hold one of the server's
    threads, and enough of them would stall every route."""
    slot = ExportSlot(request.app.state.export_slots)
    if not slot.acquire():
        raise HTTPException(
            429,
            f"export: {request.app.state.settings.export_concurrency} exports in progress; retry later",
            {"Retry-After": str(EXPORT_RETRY_AFTER_S)},
        )
    engine = request.app.state.export_engine
    filters = query.only_filter()

    def rows():
        # The session lives as long as the stream: it is opened when the first chunk is asked for.
        try:
            with session_scope(engine) as session:
                for row in pair_queries.stream_pairs(session, filters):
                    if in_split(row.prompt, query.split, query.test_fraction):
                        yield export_row(row, style=query.style, metadata=query.metadata)
        finally:
            slot.release()

    if query.format == "jsonl":
        chunks = jsonl_chunks(rows())
    else:
        chunks = parquet_chunks(rows(), style=query.style, metadata=query.metadata)
    return StreamingResponse(
        chunks,
        media_type=_MEDIA_TYPES[query.format],
        headers={"Content-Disposition": f'attachment; filename="pairs-{query.split}.{query.format}"'},
        background=BackgroundTask(slot.release),
    )


class ExportSlot:
    """One of the export semaphore's slots, released exactly once: when the stream ends, after
    the response, or when the stream is dropped unread (a client gone before the first byte)."""

    def __init__(self, slots: threading.BoundedSemaphore):
        self.slots = slots
        self.held = False
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        self.held = self.slots.acquire(blocking=False)
        return self.held

    def release(self) -> None:
        with self._lock:
            if self.held:
                self.held = False
                self.slots.release()

    def __del__(self) -> None:
        self.release()
