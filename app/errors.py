"""Error responses: every 4xx names the field at fault, and none carries a server path or a raw
database message (those go to the log)."""

from __future__ import annotations

import logging
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from cai_dpo.core.constitutions import ConstitutionError, UnknownConstitution
from cai_dpo.core.errors import FieldError
from cai_dpo.core.requests import TooManyPrompts

log = logging.getLogger(__name__)

# Pydantic names union members in error locations ("str", "list[ChatMessage]"): not fields.
_NAMED = re.compile(r"^([a-z_][a-z0-9_.]*): (.+)$", re.S)
_NOT_FIELDS = {"body", "query", "path", "header", "str", "int", "float", "bool", "dict", "list"}


def field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _NOT_FIELDS or "[" in p))]
    return ".".join(parts) or "body"


def error_response(
    status_code: int, errors: list[dict[str, str]], headers: dict[str, str] | None = None
) -> JSONResponse:
    first = errors[0]
    return JSONResponse(
        status_code=status_code,
        content={"detail": f"{first['field']}: {first['message']}", "errors": errors},
        headers=headers,
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
    # A path whose ids name no resource (`/pairs/None`, `/jobs/0`) is Not Found, as for an id
    # that names no row: the path is where a resource would be, not a form the client filled in.
    if status == 422 and all(error["loc"][:1] == ("path",) for error in exc.errors()):
        status = 404
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


# A route's `HTTPException("<field>: <message>")` (the field may be a header: `Idempotency-Key`);
# Starlette's own errors name no field: then the part of the request at fault.
_HTTP_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*): (.+)$", re.S)
_UNNAMED_FIELDS = {404: "path", 405: "method"}


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """An `HTTPException` as every other error: `detail` "<field>: <message>" and `errors`."""
    # FastAPI's own words for a body json.loads gave up on (nested thousands deep): name the field.
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        reason = exc.__cause__.__class__.__name__ if exc.__cause__ else "unreadable"
        return error_response(400, [{"field": "body", "message": f"malformed JSON ({reason})"}])
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every method of the path, not only those of the first route found
        headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=headers)
    named = _HTTP_NAMED.match(str(exc.detail))
    unnamed = (_UNNAMED_FIELDS.get(exc.status_code, "request"), exc.detail)
    field, message = named.groups() if named else unnamed
    return error_response(exc.status_code, [{"field": field, "message": str(message)}], headers)


def allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


async def invalid_unicode(request: Request, exc: UnicodeError) -> JSONResponse:
    """JSON may escape a lone surrogate (`"\\ud800"`) that no UTF-8 text can hold; pydantic's core
    raises on it before any field validator sees it (a dict key, say)."""
    return error_response(400, [{"field": "body", "message": f"not valid Unicode text: {exc.reason}"}])


async def unknown_constitution(request: Request, exc: UnknownConstitution) -> JSONResponse:
    return error_response(404, [{"field": "constitution", "message": str(exc)}])


async def too_many_prompts(request: Request, exc: TooManyPrompts) -> JSONResponse:
    message = f"{exc.count} prompts; at most {exc.limit} per request (CAI_MAX_PROMPTS_PER_REQUEST)"
    return error_response(413, [{"field": "prompts", "message": message}])


async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client hung up mid-body: its own doing, worth a line, not a traceback at ERROR."""
    log.info("%s %s: the client disconnected before its body was read", request.method, request.url.path)
    return Response(status_code=400)  # never delivered; the audit log records it as a 400


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
    app.add_exception_handler(ClientDisconnect, client_gone)
