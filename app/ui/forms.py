"""The console's forms: the posted form once its CSRF token is good (`console_form`, `FormDep`), its
fields, and what a refused action shows.

The Guard (`app/security.py`) has authenticated the caller (an API key or the console's session
cookie), checked the scope and, when htmx sent the token as a header, the CSRF token, before a
route here runs; `console_form` checks the token of every post whose token came in the form
instead. An action runs in a savepoint (`act`); a refusal is shown where it happened, as a 4xx
fragment naming the field (`errors_fragment`), as the API's errors do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

from app.errors import field_name
from app.ui.auth import CSRF_COOKIE, CSRF_FIELD, SESSION_COOKIE, ConsoleAuth
from app.ui.render import fragment, templates
from cai_dpo.core.constitutions import ConstitutionError
from cai_dpo.core.errors import FieldError
from cai_dpo.core.settings import Settings


class ConsoleError(Exception):
    """A refusal a console page shows as a page: the field at fault and why, with a status."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


def refused(exc: Exception) -> tuple[int, list[str]]:
    """The status and "field: message" lines of an error a form met."""
    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            field = field_name(error["loc"])
            if ": " in message and error.get("type") == "value_error":
                inner, message = message.split(": ", 1)
                field = inner if field == "body" else f"{field}.{inner}"
            lines.append(f"{field}: {message}")
        return 422, lines
    if isinstance(exc, FieldError):
        return exc.status_code, [f"{exc.field}: {exc.message}"]
    if isinstance(exc, ConstitutionError):
        where = f" (line {exc.line})" if exc.line else ""
        return 422, [f"{exc.field or 'body'}: {exc.message}{where}"]
    if isinstance(exc, HTTPException):
        return exc.status_code, [str(exc.detail)]
    if isinstance(exc, ConsoleError):
        return exc.status, [f"{exc.field}: {exc.message}"]
    raise exc


ACTION_ERRORS = (ValidationError, FieldError, ConstitutionError, HTTPException, ConsoleError)


def act(session: Session, action: Callable[[], Any]) -> Any:
    """Run a service function in a savepoint: a refusal leaves nothing of it behind."""
    with session.begin_nested():
        return action()


def errors_fragment(element_id: str, exc: Exception) -> HTMLResponse:
    """The errors in place of the element `element_id`, wherever the form meant to swap."""
    status, lines = refused(exc)
    html = templates.get_template("_errors.html").render(element_id=element_id, lines=lines)
    response = fragment(html, status)
    target = f"#{element_id}"
    response.headers.update({"HX-Retarget": target, "HX-Reselect": target, "HX-Reswap": "outerHTML"})
    return response


async def console_form(request: Request) -> FormData:
    """The posted form, once its CSRF token is known good (from the header, checked by the Guard,
    or from the form's field, checked here)."""
    settings: Settings = request.app.state.settings
    try:
        form = await request.form(max_files=4, max_fields=200, max_part_size=settings.max_body_bytes)
    except MultiPartException as exc:
        raise ConsoleError(400, "body", f"unreadable form: {exc.message}") from None
    except UnicodeDecodeError as exc:
        raise ConsoleError(400, "body", f"not UTF-8 text: {exc.reason}") from None
    if not getattr(request.state, "csrf_checked", False):
        auth: ConsoleAuth = request.app.state.console_auth
        token = form.get(CSRF_FIELD)
        cookies = request.cookies
        if not auth.csrf_ok(
            cookies.get(CSRF_COOKIE), cookies.get(SESSION_COOKIE), token if isinstance(token, str) else None
        ):
            raise ConsoleError(403, "csrf_token", "missing or stale; reload the page")
    return form


FormDep = Annotated[FormData, Depends(console_form)]


def text_field(form: FormData, name: str) -> str:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise ConsoleError(422, name, "expected text, got a file")
    return value or ""


def int_field(form: FormData, name: str, default: int, low: int, high: int) -> int:
    raw = text_field(form, name).strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ConsoleError(422, name, f"{raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConsoleError(422, name, f"{value}; between {low} and {high}")
    return value


def given(form: FormData, *names: str) -> dict[str, str]:
    """The named fields the user filled in (blank ones are left to the defaults)."""
    return {name: value for name in names if (value := text_field(form, name).strip())}
