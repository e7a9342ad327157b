"""`POST /datasets/import`: preference pairs from JSONL (TRL standard/conversational, HH-RLHF, or
OpenAI preference fine-tuning lines), a Parquet file with those columns, or a Hugging Face dataset
folder as a tar (its data/*.parquet); `POST /datasets/decontaminate`: flag pairs whose prompts
overlap an imported evaluation set.

The upload is read as a stream and parsed line by line; it is all or nothing (a file with a bad
row imports no row). With an `Idempotency-Key`, a retried upload returns the first import instead
of adding every pair again.
"""

import codecs
import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.access import BINARY, MULTIPART, NDJSON, PARQUET, access
from app.deps import CallerDep, SessionDep, SettingsDep
from app.openapi import IMPORT_BODY, errors
from app.schemas import DecontaminateIn, DecontaminateOut
from cai_dpo.core.api_keys import scoped_idempotency_key
from cai_dpo.core.db import session_scope
from cai_dpo.core.dedup import NgramIndex
from cai_dpo.core.errors import FieldError
from cai_dpo.core.export_format import prompt_text
from cai_dpo.core.pair_import import (
    TooManyRows,
    UnreadableFile,
    hub_folder_lines,
    parquet_lines,
    parse_pairs,
)
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.settings import Settings
from cai_dpo.core.storable import StorableText

router = APIRouter(prefix="/datasets", tags=["datasets"])


async def upload_chunks(request: Request) -> tuple[str, AsyncIterator[bytes]]:
    """The upload's name and its bytes as they come: the body (`application/x-ndjson`) or the
    multipart field `file` (spooled to disk by the form parser, then read in chunks)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form()
        except StarletteHTTPException as exc:  # Starlette's "Invalid multipart data.", naming nothing
            raise FieldError("body", f"malformed multipart upload: {exc.detail}", 400) from exc
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise FieldError("file", "a multipart upload needs a file field named 'file'")

        async def file_chunks() -> AsyncIterator[bytes]:
            while chunk := await upload.read(1 << 20):
                yield chunk

        return upload.filename or "upload", file_chunks()
    return "upload", request.stream()


async def read_lines(chunks: AsyncIterator[bytes], digest) -> list[str]:
    """UTF-8 lines of the stream (hashing its bytes as they pass)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, partial, offset = [], "", 0
    try:
        async for chunk in chunks:
            digest.update(chunk)
            text = partial + decoder.decode(chunk)
            *complete, partial = text.split("\n")
            lines += complete
            offset += len(chunk)
        partial += decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise FieldError("body", f"not UTF-8 text near byte {offset + exc.start}", 400) from exc
    return lines + [partial] if partial else lines


@router.post("/import", status_code=201, responses=errors(409), openapi_extra=IMPORT_BODY)
@access("admin", accepts=NDJSON + MULTIPART + BINARY, cap="import")
async def import_pairs(
    request: Request,
    settings: SettingsDep,
    caller: CallerDep,
    source: Annotated[
        StorableText | None, Query(max_length=200, description="Source tag (default: import:<file name>).")
    ] = None,
    constitution: Annotated[
        StorableText | None, Query(max_length=64, description="Tag the pairs with a constitution.")
    ] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    name, chunks = await upload_chunks(request)
    digest = hashlib.sha256(f"{source}\0{constitution}\0".encode())
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in BINARY:  # a Parquet file or a Hub dataset folder's tar: read whole, then its rows
        parts = []
        async for chunk in chunks:
            digest.update(chunk)
            parts.append(chunk)
        data = b"".join(parts)
        read = parquet_lines if media == PARQUET else hub_folder_lines
        try:
            lines = await run_in_threadpool(read, data)
        except UnreadableFile as exc:
            raise FieldError("body", str(exc), 400) from None
    else:
        lines = await read_lines(chunks, digest)
    # Parsing and the database are blocking work: off the event loop.
    return await run_in_threadpool(
        store_import,
        request,
        lines,
        name=name,
        source=source,
        constitution=constitution,
        idempotency_key=scoped_idempotency_key(caller, idempotency_key),
        request_hash=digest.hexdigest(),
        settings=settings,
    )


def store_import(
    request: Request,
    lines: list[str],
    *,
    name: str,
    source: str | None,
    constitution: str | None,
    idempotency_key: str | None,
    request_hash: str,
    settings: Settings,
):
    with session_scope(request.app.state.engine) as session:
        if idempotency_key is not None:
            previous = pair_queries.find_import_by_idempotency_key(session, idempotency_key)
            if previous is not None:
                return _replayed(previous, request_hash)
    try:
        pairs, errors = parse_pairs(
            lines, max_rows=settings.max_import_rows, max_field_chars=settings.max_import_field_chars
        )
    except TooManyRows as exc:
        raise FieldError("body", str(exc), 413) from None
    if errors:  # all or nothing: a file with a bad row imports no row
        first = errors[0]
        detail = f"line {first['line']}: {first['message']} (nothing imported)"
        rows = [{"field": "body", **error} for error in errors]
        return JSONResponse(status_code=422, content={"detail": detail, "errors": rows})
    if not pairs:
        raise FieldError("body", "no pairs in the upload")
    tag = source or f"import:{name}"
    rows = [
        {
            "prompt": p.prompt,
            "chosen": p.chosen,
            "rejected": p.rejected,
            "constitution_name": constitution,
            "flags": [],
        }
        for p in pairs
    ]
    with session_scope(request.app.state.engine) as session:
        record = pair_queries.insert_imported_pairs(
            session,
            source=tag,
            format=",".join(sorted({p.format for p in pairs})),
            rows=rows,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
    if record is None:  # a concurrent upload with the same key won; nothing of ours was written
        with session_scope(request.app.state.engine) as session:
            return _replayed(
                pair_queries.find_import_by_idempotency_key(session, idempotency_key), request_hash
            )
    request.state.audit_ids = {"import_id": str(record.id)}
    return _import_out(record)


def _replayed(previous, request_hash: str) -> dict:
    if previous is None or previous.request_hash != request_hash:
        raise HTTPException(409, "Idempotency-Key: already used for a different upload")
    return _import_out(previous)


def _import_out(record) -> dict:
    return {
        "import_id": record.id,
        "n_pairs": record.n_pairs,
        "source": record.source,
        "formats": record.format.split(","),
    }


@router.post("/decontaminate", response_model=DecontaminateOut, responses=errors(404))
@access("admin")
def decontaminate(request: Request, session: SessionDep, body: DecontaminateIn):
    """Flag `contaminated` every pair whose prompt shares a run of `n` words (case and punctuation
    ignored; all the words of a shorter benchmark prompt) with a prompt of the evaluation set, as
    the common decontamination scripts do, so a team's held-out benchmark stays held out of
    training: flagged pairs are left out of /export and /train unless asked for."""
    benchmark = pair_queries.pair_prompts(
        session, body.benchmark.model_copy(update={"include_flagged": True})
    )
    if not benchmark:
        raise FieldError("benchmark", "selects no pair: import the evaluation set first", 404)
    own = {pair_id for pair_id, _ in benchmark}
    texts = sorted({prompt_text(prompt) for _, prompt in benchmark})
    index = NgramIndex(texts, n=body.n)
    checked, hits = 0, []
    for pair_id, prompt in pair_queries.pair_prompts(session, body.pairs):
        if pair_id in own:
            continue
        checked += 1
        if (run := index.overlap(prompt_text(prompt))) is not None:
            hits.append((pair_id, run))
    newly = pair_queries.flag_pairs(session, [pair_id for pair_id, _ in hits], "contaminated")
    request.state.audit_ids = {"contaminated": str(len(hits))}
    return DecontaminateOut(
        benchmark_prompts=len(texts),
        checked=checked,
        contaminated=len(hits),
        newly_flagged=newly,
        examples=[{"pair_id": pair_id, "overlap": run} for pair_id, run in hits[:20]],
    )
