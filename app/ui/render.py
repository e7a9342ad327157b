"""How the console answers: whole pages (with the CSRF token their forms carry), fragments for
htmx to swap in, redirects after a form, and error pages; every answer carries `SECURITY_HEADERS`."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.ui.auth import CSRF_COOKIE, CSRF_FIELD, SESSION_COOKIE, ConsoleAuth
from cai_dpo.core.pair_flags import FLAGS

HERE = Path(__file__).parent
PAGE_SIZE = 50
SECURITY_HEADERS = {
    # Scripts only from the app: a model's text that slipped past escaping could still run nothing.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Jinja2Templates(directory=HERE / "templates")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "–"


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _excerpt(text: str | None, n: int = 140) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


templates.env.filters |= {"duration": _duration, "when": _when, "number": _number, "excerpt": _excerpt}
templates.env.globals |= {"prompt_text": _prompt_text, "flag_help": FLAGS}


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def page(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """A page (or the fragment of one htmx asked for) with the CSRF token its forms carry."""
    auth: ConsoleAuth = request.app.state.console_auth
    cookie = request.cookies.get(CSRF_COOKIE)
    fresh = cookie is None
    if fresh:
        cookie = auth.new_csrf_cookie()
    caller = getattr(request.state, "caller", None)
    context |= {
        "caller": caller,
        # Buttons the key may not use are shown disabled (the Guard refuses them anyway).
        "can": lambda scope: caller is None or caller.allows(scope),
        "csrf": auth.csrf_token(cookie, request.cookies.get(SESSION_COOKIE)),
        "csrf_field": CSRF_FIELD,
        "auth_enabled": request.app.state.keys.enabled,
        "path": request.url.path,
    }
    response = templates.TemplateResponse(request, template, context, status_code=status)
    if fresh:
        set_cookie(response, request, CSRF_COOKIE, cookie, None)
    response.headers.update(SECURITY_HEADERS)
    return response


def list_page(
    request: Request, template: str, name: str, rows: list[Any], open_states: set[str], **context: Any
) -> HTMLResponse:
    """A page of `rows` (newest first, `PAGE_SIZE` at most) under `name`: live (polled) while any
    row is still open, with the id to page on from when the page is full."""
    return page(
        request,
        template,
        **{name: rows},
        live=any(row.status in open_states for row in rows),
        older=rows[-1].id if len(rows) == PAGE_SIZE else None,
        **context,
    )


def fragment(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def is_htmx(request: Request) -> bool:
    return "hx-request" in request.headers


def go(request: Request, url: str) -> Response:
    """After a form: htmx is told where to go; a plain form post is redirected."""
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def error_page(request: Request, status: int, field: str, message: str) -> Response:
    """An error where it happened: the errors fragment for htmx, else a page naming the field."""
    if is_htmx(request):  # a fragment where the page expected one
        return page(
            request, "_errors.html", status=status, element_id="errors", lines=[f"{field}: {message}"]
        )
    return page(request, "error.html", status=status, status_code=status, field=field, message=message)
