"""Who may call what, decided before a byte of the request body is read.

`Guard` is the outermost ASGI middleware. With API keys configured it answers a request that
has no valid key with 401, and one whose key lacks the route's scope with 403, without reading
its body. With no keys (loopback mode) it accepts only loopback `Host` names and refuses
cross-site browser requests (an `Origin` of another host), so a web page open in the user's
browser cannot drive the service. Either way, a body must come with its route's content type and
within its route's size cap (415 / 413), and every mutating call is written to the audit log.

The console (`/ui`) is a browser's: on its paths only, a signed session cookie (`app/ui/auth.py`)
stands for the key it was opened with, a refusal is a page (or a redirect to the login form), its
forms may post `application/x-www-form-urlencoded` and `multipart/form-data`, and every post must
carry the CSRF token: in the `X-CSRF-Token` header, checked here before the body is read, or in the
form's `csrf_token` field, which the console's form dependency checks (`app/ui/router.py`).

The scope of every route, the console's included, is decided here, in `required_scope`, in one table.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.schemas import request_settings
from app.ui.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    ConsoleAuth,
    is_console,
)
from cai_dpo.core.api_keys import SCOPES, ApiKey, KeyRing
from cai_dpo.core.settings import Settings

log = logging.getLogger(__name__)

# The caller when no key is configured (loopback mode): every scope.
LOCAL_CALLER = ApiKey("local", frozenset(SCOPES), "")

PUBLIC_PATHS = {"/health"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}

JSON = ("application/json",)
YAML = ("application/yaml", "application/x-yaml", "text/yaml")
NDJSON = ("application/x-ndjson", "application/jsonl", "application/json-lines")
MULTIPART = ("multipart/form-data",)
FORM = ("application/x-www-form-urlencoded",)
# The console's pages that need no key: its login form, sign-out, and its scripts and styles.
CONSOLE_PUBLIC = {"/ui/login", "/ui/logout"}
CONSOLE_STATIC = "/ui/static/"
# A cross-site HTML form can send multipart/form-data but cannot add a header: an upload must
# carry this one (any value), which makes a browser ask first (CORS), and we never say yes.
UPLOAD_HEADER = "x-requested-by"


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs; None for public paths."""
    if path in PUBLIC_PATHS or path in CONSOLE_PUBLIC or path.startswith(CONSOLE_STATIC):
        return None
    if is_console(path):
        # The console's pages read; its forms post to the path of the API route they stand for
        # (`/ui/generate`, `/ui/pairs/{id}/review`, ...) and take its scope, but for two of its own:
        if method == "POST" and path.startswith("/ui/constitutions/"):
            if path.endswith("/check"):  # validates the editor's text; writes nothing
                return "read"
            if path.endswith("/try"):  # a one-prompt generation job on the unsaved text
                return "generate"
        path = path.removeprefix("/ui") or "/"
    if method in ("GET", "HEAD", "OPTIONS"):
        return "admin" if path.startswith(("/audit", "/keys")) else "read"
    if path == "/generate" or path.startswith("/jobs/"):
        return "generate"
    if path.startswith("/train"):
        return "train"
    if path.startswith("/pairs/") and path.endswith("/review"):
        return "review"
    return "admin"  # constitutions (the console's editor too), imports, anything new until it says otherwise


def accepted_types(method: str, path: str) -> tuple[str, ...]:
    if is_console(path):
        return FORM + MULTIPART
    if path.startswith("/constitutions/"):
        return YAML
    if path.startswith("/datasets/import"):
        return NDJSON + MULTIPART
    return JSON


def body_cap(method: str, path: str, settings: Settings) -> int:
    if path.startswith("/constitutions/"):
        return settings.max_constitution_bytes
    if path.startswith("/datasets/import"):
        return settings.max_import_bytes
    return settings.max_body_bytes


def error(status: int, field: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"detail": f"{field}: {message}", "errors": [{"field": field, "message": message}]},
        headers=headers,
    )


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def console_refusal(status: int, field: str, message: str, scope: Scope) -> Response:
    """A refusal on a console path: no key yet is the login form (an htmx request is told to go
    there, back to its page afterwards); anything else a small page naming the field."""
    headers = Headers(scope=scope)
    if status == 401:
        if "hx-request" in headers:  # a poll or a form of a page: back to that page after login
            current = urlsplit(headers.get("hx-current-url", ""))
            back = current.path + (f"?{current.query}" if current.query else "")
        else:
            query = scope.get("query_string", b"").decode("latin-1")
            back = scope["path"] + (f"?{query}" if query else "")
        target = "/ui/login" + (f"?next={quote(back, safe='')}" if is_console(back) else "")
        if "hx-request" in headers:
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)
    body = f'<p class="refusal" role="alert">{html.escape(field)}: {html.escape(message)}</p>'
    return HTMLResponse(body, status_code=status)


class BodyTooLarge(Exception):
    pass


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        keyring: KeyRing,
        audit: Callable[[dict[str, Any]], None],
        console: ConsoleAuth,
        routes: list[BaseRoute] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.keyring = keyring
        self.audit = audit
        self.console = console
        # The app's routes, to name a refused request's route as a routed one would be named.
        self.routes = routes or []
        self.local_hosts = {"localhost", "127.0.0.1", "::1", settings.host.lower()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = Headers(scope=scope)
        caller, refusal = self.authenticate(method, path, headers)
        if refusal is None:
            refusal = self.check_body_headers(method, path, headers)
        if refusal is None and is_console(path) and method in MUTATING:
            refusal = self.check_csrf_header(headers, scope)
        if refusal is not None:
            if is_console(path) and isinstance(refusal, JSONResponse):
                first = json.loads(refusal.body)["errors"][0]
                refusal = console_refusal(refusal.status_code, first["field"], first["message"], scope)
            await refusal(scope, receive, send)
            await self.record(scope, caller, refusal.status_code)
            return
        scope.setdefault("state", {})["caller"] = caller
        request_settings.set(self.settings)
        cap = body_cap(method, path, self.settings)
        received = 0
        status = 500

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:
                raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except BodyTooLarge:
            if status == 500:  # nothing sent yet
                status = 413
                await error(413, "body", f"more than {cap} bytes for {path}")(scope, receive, send)
        finally:
            await self.record(scope, caller, status)

    def authenticate(self, method: str, path: str, headers: Headers) -> tuple[ApiKey | None, Any]:
        needed = required_scope(method, path)
        if not self.keyring.enabled:
            host = (headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if host and host not in self.local_hosts:
                return None, error(400, "host", f"{host!r} is not this service's loopback address")
            origin = headers.get("origin")
            if origin and (urlsplit(origin).hostname or "").lower() not in self.local_hosts:
                return None, error(403, "origin", "cross-site requests are refused")
            return LOCAL_CALLER, None
        token = bearer_token(headers)
        caller = self.keyring.find(token) if token else None
        if caller is None and is_console(path):
            caller = self.console.session_key(cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE))
        if needed is None:
            return caller, None
        if caller is None:
            return None, error(
                401,
                "authorization",
                "missing or invalid API key (send `Authorization: Bearer <key>`)",
                {"WWW-Authenticate": "Bearer"},
            )
        if not caller.allows(needed):
            return caller, error(403, "authorization", f"key {caller.name!r} lacks the {needed!r} scope")
        return caller, None

    def check_body_headers(self, method: str, path: str, headers: Headers) -> Any:
        if method not in MUTATING:
            return None
        length = headers.get("content-length")
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        cap = body_cap(method, path, self.settings)
        if length is not None and length.isdigit() and int(length) > cap:
            return error(413, "body", f"{int(length)} bytes; at most {cap} for {path}")
        if not has_body:
            return None
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        accepted = accepted_types(method, path)
        if media not in accepted:
            return error(415, "content-type", f"{media or 'none'}; expected {' or '.join(accepted)}")
        # The console's uploads carry the CSRF token instead (see check_csrf_header).
        if media in MULTIPART and UPLOAD_HEADER not in headers and not is_console(path):
            return error(403, UPLOAD_HEADER, "a multipart upload needs this header (any value)")
        return None

    def check_csrf_header(self, headers: Headers, scope: Scope) -> Any:
        """A console post's CSRF token, where it comes as a header; one that comes in the form's
        field instead is checked by the console's form dependency, which sees `csrf_checked` unset."""
        token = headers.get(CSRF_HEADER)
        if token is None:
            return None
        if not self.console.csrf_ok(cookie_parser(headers.get("cookie", "")).get(CSRF_COOKIE), token):
            return error(403, "csrf_token", "missing or stale; reload the page")
        scope.setdefault("state", {})["csrf_checked"] = True
        return None

    def route_template(self, scope: Scope) -> str:
        """`/jobs/{job_id}/retry` for `/jobs/7/retry`: a request refused before routing is logged
        under its route's template, as one that reached it is."""
        return template_of(self.routes, scope) or scope["path"]

    async def record(self, scope: Scope, caller: ApiKey | None, status: int) -> None:
        """Every mutating call, allowed or not, goes to the audit log (written off the event loop)."""
        if scope["method"] not in MUTATING:
            return
        route = getattr(scope.get("route"), "path", None) or self.route_template(scope)
        if is_console(scope["path"]) and not is_console(route):  # a route of the console's mount
            route = "/ui" + route
        entry = {
            "key_name": caller.name if caller else None,
            "method": scope["method"],
            "route": route,
            "status": status,
            "ids": {k: str(v) for k, v in (scope.get("path_params") or {}).items()}
            | (scope.get("state") or {}).get("audit_ids", {}),
        }
        try:
            json.dumps(entry)
        except (TypeError, ValueError):
            entry["ids"] = {}
        try:
            await anyio.to_thread.run_sync(self.audit, entry)
        except Exception:  # noqa: BLE001 - the response is sent; a lost audit row is logged
            log.exception("audit log write failed: %s", entry)


def template_of(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The template of the route `scope` reaches, through mounts (the console's `/ui`), with its
    path parameters added to `scope`; None where no route matches in full."""
    for route in routes:
        match, child = route.matches(scope)
        if match != Match.FULL:
            continue
        scope.setdefault("path_params", {}).update(child.get("path_params", {}))
        inner = getattr(route, "routes", None)
        path = getattr(route, "path", "")
        if isinstance(route, Mount) and inner:
            rest = template_of(inner, scope | child)
            return path + rest if rest is not None else None
        return path or None
    return None
