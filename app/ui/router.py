"""The console's router: its static assets and the pages of `app/ui/pages/` under one mount at
`/ui`, and `install_console`, which mounts it and makes errors on console paths pages.

The pages' routers are included in a fixed order, and within each page its routes keep theirs: a
request takes the first route that matches (`/constitutions/{name}/check` before
`/constitutions/{name}`), and so does the Guard when it reads the route's access.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.access import PUBLIC, declare
from app.errors import field_name
from app.ui.auth import ConsoleAuth, is_console
from app.ui.forms import ConsoleError
from app.ui.pages import auth, constitutions, jobs, pairs, training, workers
from app.ui.render import HERE, error_page

router = APIRouter(include_in_schema=False)
# Its scripts and styles are public: the login page needs them before any key is given.
router.mount("/static", declare(StaticFiles(directory=HERE / "static"), PUBLIC), name="static")
for module in (auth, jobs, pairs, constitutions, training, workers):
    router.include_router(module.router)


def install_console(app: FastAPI) -> ConsoleAuth:
    """Mount the console at /ui (outside the API's schema) and return its session signer, which
    the Guard needs. Call after the API's error handlers are installed: on console paths, errors
    become pages; elsewhere the API's handlers answer as before."""
    auth = ConsoleAuth(app.state.settings.session_secret, app.state.keys)
    app.state.console_auth = auth
    app.mount("/ui", router, name="ui")

    async def console_error(request: Request, exc: ConsoleError) -> Response:
        return error_page(request, exc.status, exc.field, exc.message)

    api_http_error = app.exception_handlers[StarletteHTTPException]
    api_validation_error = app.exception_handlers[RequestValidationError]

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not is_console(request.url.path):
            return await api_http_error(request, exc)
        field, _, message = str(exc.detail).partition(": ")
        return error_page(request, exc.status_code, field if message else "path", message or str(exc.detail))

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if not is_console(request.url.path):
            return await api_validation_error(request, exc)
        first = exc.errors()[0]
        return error_page(request, 422, field_name(first["loc"]), first["msg"])

    app.add_exception_handler(ConsoleError, console_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    return auth
