"""`GET /export`: the dataset as TRL-ready JSONL or Parquet, streamed from a server-side cursor, or
as a Hugging Face Hub dataset folder (Parquet shards per split and a dataset card) in a tar stream."""

import tempfile
import threading
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from app.access import access
from app.openapi import errors
from app.schemas import ExportQuery
from cai_dpo.core.db import session_scope
from cai_dpo.core.dedup import keep_one_per_group
from cai_dpo.core.export_format import export_row, in_split, jsonl_chunks, parquet_chunks, prompt_text
from cai_dpo.core.hf_dataset import HubFolder, Provenance, dataset_card, tar_chunks
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.queries import pairs as pair_queries

router = APIRouter(tags=["export"])

# What a refused export is told to wait: an export of a few thousand pairs takes about this long.
EXPORT_RETRY_AFTER_S = 5
_MEDIA_TYPES = {
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
    "hf": "application/x-tar",
}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The pairs: JSON Lines (one TRL row per line), a Parquet file, or (`format=hf`) "
            "a tar of a Hub dataset folder `pairs/` (README.md card, data/<split>-0000i-of-0000N.parquet).",
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
    keep = kept_after_dedup(engine, filters) if query.dedup == "prompt" else None

    def rows():
        # The session lives as long as the stream: it is opened when the first chunk is asked for.
        try:
            with session_scope(engine) as session:
                for row in pair_queries.stream_pairs(session, filters):
                    if keep is not None and row.id not in keep:
                        continue
                    if in_split(row.prompt, query.split, query.test_fraction):
                        yield export_row(row, style=query.style, metadata=query.metadata)
        finally:
            slot.release()

    if query.format == "hf":
        chunks = hub_folder_chunks(engine, query, filters, slot, keep)
        filename = "pairs.tar"
    else:
        filename = f"pairs-{query.split}.{query.format}"
        if query.format == "jsonl":
            chunks = jsonl_chunks(rows())
        else:
            chunks = parquet_chunks(rows(), style=query.style, metadata=query.metadata)
    return StreamingResponse(
        chunks,
        media_type=_MEDIA_TYPES[query.format],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        background=BackgroundTask(slot.release),
    )


def kept_after_dedup(engine, filters: PairFilter) -> set[int]:
    """`dedup=prompt`: the ids of the pairs kept, one per group of near-duplicate prompts."""
    with session_scope(engine) as session:
        items = pair_queries.pair_prompt_margins(session, filters)
    return keep_one_per_group([(pair_id, prompt_text(prompt), margin) for pair_id, prompt, margin in items])


def hub_folder_chunks(
    engine, query: ExportQuery, filters: PairFilter, slot: "ExportSlot", keep: set[int] | None = None
):
    """The Hub folder, built in a temporary directory (the card needs every row's provenance and
    the split counts before its first byte), then streamed as a tar a block at a time."""
    with tempfile.TemporaryDirectory(prefix="cai-dpo-hf-") as tmp:
        root = Path(tmp) / "pairs"
        try:
            with session_scope(engine) as session:
                folder = HubFolder(
                    root, query.style, query.test_fraction, shard_bytes=int(query.shard_mb * 2**20)
                )
                versions: set[str] = set()
                job_ids: set[int] = set()
                models: set[str] = set()
                scorers: set[str] = set()
                sources: set[str] = set()
                dropped = 0
                for row in pair_queries.stream_pairs(session, filters):
                    if keep is not None and row.id not in keep:
                        dropped += 1
                        continue
                    folder.add(export_row(row, style=query.style, metadata=True), row.prompt)
                    versions.update([row.constitution_version] if row.constitution_version else [])
                    job_ids.update([row.job_id] if row.job_id else [])
                    models.update([row.model] if row.model else [])
                    scorers.update([row.scorer] if row.scorer else [])
                    sources.add(row.source)
                counts = folder.finish()
                made = pair_queries.export_provenance(session, filters, versions=versions, job_ids=job_ids)
        finally:
            slot.release()
        provenance = Provenance(
            constitutions=made["constitutions"],
            models=sorted(models),
            modes=made["jobs"],
            scorers=sorted(scorers),
            sources=sorted(sources),
            flag_counts=made["flag_counts"],
        )
        if not filters.include_flagged and filters.flag is None and made["flag_counts"]:
            provenance.left_out["carry a quality flag"] = _flagged_pairs(engine, filters)
        if dropped:
            provenance.left_out["dedup=prompt: another pair of a near-duplicate prompt was kept"] = dropped
        shards = {
            split: [f"data/{p.name}" for p in sorted((root / "data").glob(f"{split}-*.parquet"))]
            for split in counts
        }
        num_bytes = {
            split: sum((root / path).stat().st_size for path in paths) for split, paths in shards.items()
        }
        card = dataset_card(
            pretty_name="cai-dpo preference pairs",
            license=query.license,
            features=folder.features(),
            counts=counts,
            shards=shards,
            num_bytes=num_bytes,
            style=query.style,
            test_fraction=query.test_fraction,
            filter=filters.described(),
            provenance=provenance,
        )
        (root / "README.md").write_text(card)
        yield from tar_chunks(root)


def _flagged_pairs(engine, filters: PairFilter) -> int:
    with session_scope(engine) as session:
        flagged = filters.model_copy(update={"include_flagged": True, "flag": None})
        return pair_queries.count_pairs(session, flagged) - pair_queries.count_pairs(session, filters)


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
