"""Error responses: every 4xx names the field at fault, and none carries a server path or a raw
database message (those go to the log)."""

from __future__ import annotations

import logging
import re

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cai_dpo.api.schemas import FieldError, TooManyPrompts
from cai_dpo.core.constitutions import ConstitutionError, UnknownConstitution

log = logging.getLogger(__name__)

# Pydantic names union members in error locations ("str", "list[ChatMessage]"): not fields.
_NAMED = re.compile(r"^([a-z_][a-z0-9_.]*): (.+)$", re.S)
_NOT_FIELDS = {"body", "query", "path", "header", "str", "int", "float", "bool", "dict", "list"}


def field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _NOT_FIELDS or "[" in p))]
    return ".".join(parts) or "body"


def error_response(status_code: int, errors: list[dict[str, str]]) -> JSONResponse:
    first = errors[0]
    return JSONResponse(
        status_code=status_code, content={"detail": f"{first['field']}: {first['message']}", "errors": errors}
    )


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    status = 422
    # With a union (a prompt is a string or a message list) the deepest location is the one
    # that says what is wrong with the value the client actually sent.
    for error in sorted(exc.errors(), key=lambda e: -len(e["loc"])):
        if error.get("type") == "json_invalid":
            status = 400
            errors.append(
                {
                    "field": "body",
                    "message": f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}",
                }
            )
        else:
            message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for our checks
            field = field_name(error["loc"])
            # A model-level check says "field: problem" (a field inside the object it checked).
            if error.get("type") == "value_error" and (named := _NAMED.match(message)):
                inner, message = named.groups()
                field = inner if field == "body" else f"{field}.{inner}"
            errors.append({"field": field, "message": message})
    return error_response(status, errors)


async def field_error(request: Request, exc: FieldError) -> JSONResponse:
    return error_response(exc.status_code, [{"field": exc.field, "message": exc.message}])


async def constitution_error(request: Request, exc: ConstitutionError) -> JSONResponse:
    """An invalid constitution (PUT body or file): the field at fault inside it, and its file."""
    field = exc.field or "body"
    where = f" ({exc.path.name})" if exc.path else ""
    return JSONResponse(
        status_code=422,
        content={
            "detail": f"{field}: {exc.message}{where}",
            "errors": [{"field": field, "message": exc.message}],
            **exc.to_dict(),
        },
    )


async def unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    """A value PostgreSQL refuses (out of range, a NUL character) that validation did not catch.

    The request's transaction is rolled back, so nothing was written; the client gets a 422
    rather than a 500, and the log keeps the trace so the missing check can be added.
    """
    log.warning("%s %s: value refused by the database", request.method, request.url.path, exc_info=exc)
    message = "a value cannot be stored (out of range, or text PostgreSQL cannot hold)"
    return error_response(422, [{"field": "body", "message": message}])


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # FastAPI's own words for a body json.loads gave up on (nested thousands deep): name the field.
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        reason = exc.__cause__.__class__.__name__ if exc.__cause__ else "unreadable"
        return error_response(400, [{"field": "body", "message": f"malformed JSON ({reason})"}])
    return await http_exception_handler(request, exc)


async def invalid_unicode(request: Request, exc: UnicodeError) -> JSONResponse:
    """JSON may escape a lone surrogate (`"\\ud800"`) that no UTF-8 text can hold; pydantic's core
    raises on it before any field validator sees it (a dict key, say)."""
    return error_response(400, [{"field": "body", "message": f"not valid Unicode text: {exc.reason}"}])


async def unknown_constitution(request: Request, exc: UnknownConstitution) -> JSONResponse:
    return error_response(404, [{"field": "constitution", "message": str(exc)}])


async def too_many_prompts(request: Request, exc: TooManyPrompts) -> JSONResponse:
    message = f"{exc.count} prompts; at most {exc.limit} per request (CAI_MAX_PROMPTS_PER_REQUEST)"
    return error_response(413, [{"field": "prompts", "message": message}])


def install_error_handlers(app) -> None:
    import psycopg
    import sqlalchemy.exc

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(FieldError, field_error)
    app.add_exception_handler(ConstitutionError, constitution_error)
    app.add_exception_handler(UnknownConstitution, unknown_constitution)
    app.add_exception_handler(sqlalchemy.exc.DataError, unstorable_value)
    app.add_exception_handler(psycopg.DataError, unstorable_value)
    app.add_exception_handler(UnicodeError, invalid_unicode)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(TooManyPrompts, too_many_prompts)
