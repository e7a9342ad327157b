"""The FastAPI application: routers, error handlers, body limits and the database lifecycle."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cai_dpo.api.metrics import RequestCounter, metrics_registry
from cai_dpo.api.routes import constitutions, datasets, export, health, jobs, pairs, training, workers
from cai_dpo.api.schemas import FieldError
from cai_dpo.core.constitutions import ConstitutionError, ConstitutionStore, UnknownConstitution
from cai_dpo.core.db import database_url, get_engine, upgrade_database
from cai_dpo.core.settings import Settings, check_bind, get_settings

log = logging.getLogger(__name__)

# Pydantic names union members in error locations ("str", "list[ChatMessage]"): not fields.
_NOT_FIELDS = {"body", "query", "path", "header", "str", "int", "float", "bool", "dict", "list"}


def field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _NOT_FIELDS or "[" in p))]
    return ".".join(parts) or "body"


def error_response(status_code: int, errors: list[dict[str, str]]) -> JSONResponse:
    first = errors[0]
    return JSONResponse(
        status_code=status_code, content={"detail": f"{first['field']}: {first['message']}", "errors": errors}
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
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
            errors.append({"field": field_name(error["loc"]), "message": message})
    return error_response(status, errors)


async def _field_error(request: Request, exc: FieldError) -> JSONResponse:
    return error_response(exc.status_code, [{"field": exc.field, "message": exc.message}])


async def _constitution_error(request: Request, exc: ConstitutionError) -> JSONResponse:
    """An invalid constitution (PUT body or file): the field at fault inside it, and its file."""
    field = exc.field or "body"
    where = f" ({exc.path})" if exc.path else ""
    return JSONResponse(
        status_code=422,
        content={
            "detail": f"{field}: {exc.message}{where}",
            "errors": [{"field": field, "message": exc.message}],
            **exc.to_dict(),
        },
    )


async def _unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    """A value PostgreSQL refuses (out of range, a NUL character) that validation did not catch.

    The request's transaction is rolled back, so nothing was written; the client gets a 422
    rather than a 500, and the log keeps the trace so the missing check can be added.
    """
    log.warning("%s %s: value refused by the database", request.method, request.url.path, exc_info=exc)
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return error_response(422, [{"field": "body", "message": f"a value cannot be stored: {reason}"}])


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # FastAPI's own words for a body json.loads gave up on (nested thousands deep): name the field.
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        reason = exc.__cause__.__class__.__name__ if exc.__cause__ else "unreadable"
        return error_response(400, [{"field": "body", "message": f"malformed JSON ({reason})"}])
    return await http_exception_handler(request, exc)


async def _invalid_unicode(request: Request, exc: UnicodeError) -> JSONResponse:
    """JSON may escape a lone surrogate (`"\\ud800"`) that no UTF-8 text can hold; pydantic's core
    raises on it before any field validator sees it (a dict key, say)."""
    return error_response(400, [{"field": "body", "message": f"not valid Unicode text: {exc.reason}"}])


async def _unknown_constitution(request: Request, exc: UnknownConstitution) -> JSONResponse:
    return error_response(404, [{"field": "constitution", "message": str(exc)}])


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with a 413 before the app reads them into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                413,
                [
                    {
                        "field": "body",
                        "message": f"{int(declared)} bytes; at most {self.max_bytes} (CAI_MAX_BODY_BYTES)",
                    }
                ],
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                response = error_response(
                    413,
                    [{"field": "body", "message": f"more than {self.max_bytes} bytes (CAI_MAX_BODY_BYTES)"}],
                )
                await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    settings = settings or get_settings()
    check_bind(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        url = database_url(settings)
        if migrate:
            upgrade_database(url)
        app.state.engine = get_engine(settings, pool_size=10)
        yield
        app.state.engine.dispose()

    app = FastAPI(
        title="cai-dpo",
        summary="Constitutional-AI preference data and DPO training as a service.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.constitutions = ConstitutionStore(settings.constitutions_dir)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(FieldError, _field_error)
    app.add_exception_handler(ConstitutionError, _constitution_error)
    app.add_exception_handler(UnknownConstitution, _unknown_constitution)
    app.add_exception_handler(sqlalchemy.exc.DataError, _unstorable_value)
    app.add_exception_handler(UnicodeError, _invalid_unicode)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(psycopg.DataError, _unstorable_value)
    for module in (health, constitutions, jobs, pairs, export, workers, training, datasets):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.metrics, requests = metrics_registry(lambda: app.state.engine, settings.worker_seen_seconds)
    app.add_middleware(RequestCounter, counter=requests)
    return app
