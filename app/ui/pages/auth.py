"""The way in: `/ui/` leads to the jobs; signing in with an API key sets the session cookie, and
signing out revokes it on the server too."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from app.access import CONSOLE_FORMS, access
from app.deps import SessionDep
from app.ui.auth import CSRF_COOKIE, SESSION_COOKIE, SESSION_SECONDS, ConsoleAuth
from app.ui.forms import FormDep, text_field
from app.ui.render import page, set_cookie
from cai_dpo.core.queries import sessions as session_queries

router = APIRouter()


@router.get("/")
@access("read")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


def _safe_next(target: str | None) -> str:
    if (
        target
        and (target == "/ui" or target.startswith("/ui/"))
        and "//" not in target
        and "\\" not in target
    ):
        return target
    return "/ui/jobs"


@router.get("/login")
@access(None)
def login_page(request: Request, next: str | None = None):
    if not request.app.state.keys.enabled:
        return RedirectResponse(_safe_next(next), status_code=303)
    return page(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login")
@access(None, accepts=CONSOLE_FORMS)
def login(request: Request, form: FormDep):
    key = request.app.state.keys.find(text_field(form, "key").strip()) if text_field(form, "key") else None
    target = _safe_next(text_field(form, "next"))
    if key is None:
        return page(request, "login.html", status=401, next=target, error="key: not a valid API key")
    auth: ConsoleAuth = request.app.state.console_auth
    response = RedirectResponse(target, status_code=303)
    set_cookie(response, request, SESSION_COOKIE, auth.new_session(key), SESSION_SECONDS)
    set_cookie(response, request, CSRF_COOKIE, auth.new_csrf_cookie(), None)  # a new one per login
    return response


@router.post("/logout")
@access(None, accepts=CONSOLE_FORMS)
def logout(request: Request, form: FormDep, session: SessionDep):
    auth: ConsoleAuth = request.app.state.console_auth
    signed_in = auth.session(request.cookies.get(SESSION_COOKIE))
    if signed_in is not None:  # the cookie may have been copied: it must not outlive the sign-out
        session_queries.revoke(session, signed_in.nonce, signed_in.expires)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response
