"""`POST /datasets/import`: preference pairs from JSONL (TRL standard/conversational, or HH-RLHF)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from cai_dpo.api.deps import Authorized, SessionDep
from cai_dpo.api.schemas import FieldError
from cai_dpo.core.pair_import import parse_pairs
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.storable import StorableText

router = APIRouter(prefix="/datasets", tags=["datasets"], dependencies=[Authorized])


async def read_jsonl(request: Request) -> tuple[str, list[str]]:
    """The body as lines, from `application/x-ndjson` or a multipart field `file`."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise FieldError("file", "a multipart upload needs a file field named 'file'")
        data, name = await upload.read(), upload.filename or "upload"
    else:
        data, name = await request.body(), "upload"
    try:
        return name, data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise FieldError("body", f"not UTF-8 text: {exc}", 400) from exc


@router.post("/import", status_code=201)
def import_pairs(
    upload: Annotated[tuple[str, list[str]], Depends(read_jsonl)],
    session: SessionDep,
    source: Annotated[
        StorableText | None, Query(max_length=200, description="Source tag (default: import:<file name>).")
    ] = None,
    constitution: Annotated[
        StorableText | None, Query(max_length=64, description="Tag the pairs with a constitution.")
    ] = None,
):
    name, lines = upload
    pairs, errors = parse_pairs(lines)
    if errors:  # all or nothing: a file with a bad row imports no row
        first = errors[0]
        detail = f"line {first['line']}: {first['message']} (nothing imported)"
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})
    if not pairs:
        raise FieldError("body", "no pairs in the upload")
    tag = source or f"import:{name}"
    formats = sorted({p.format for p in pairs})
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
    record = pair_queries.insert_imported_pairs(session, source=tag, format=",".join(formats), rows=rows)
    return {"import_id": record.id, "n_pairs": record.n_pairs, "source": tag, "formats": formats}
