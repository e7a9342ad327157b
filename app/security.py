"""Who may call what, decided before a byte of the request body is read.

`Guard` is the outermost ASGI middleware. It finds the route a request reaches in the app's route
table and reads that route's own `Access` (`app/access.py`: scope, content types, body cap). With
API keys configured it answers a request that has no valid key with 401, and one whose key lacks
the route's scope with 403, without reading its body. With no keys (loopback mode) it accepts only
loopback `Host` names. Either way a browser's cross-site request is refused: a mutating request
whose `Origin` is not this service's own (scheme, host and port of its `Host`), and in loopback
mode any request from another origin. A body must come with its route's content type and within
its route's size cap (415 / 413), and every mutating call is written to the audit log under its
route's template; a client refused more than `refusals_per_minute` times a minute gets 429 and no
audit row.

The console (`/ui`) is a browser's: on its paths only, a signed session cookie (`app/ui/auth.py`)
stands for the key it was opened with (unless signed out: revoked on the server), a refusal is a
page (or a redirect to the login form), its forms may post `application/x-www-form-urlencoded` and
`multipart/form-data`, and every post must carry the CSRF token bound to the session: in the
`X-CSRF-Token` header, checked here before the body is read, or in the form's `csrf_token` field,
which the console's form dependency checks (`app/ui/forms.py`).
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.access import MULTIPART, Access, route_access
from app.ui.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    ConsoleAuth,
    is_console,
)
from cai_dpo.core.api_keys import SCOPES, ApiKey, KeyRing
from cai_dpo.core.model_refs import current_settings
from cai_dpo.core.settings import Settings

log = logging.getLogger(__name__)

# The caller when no key is configured (loopback mode): every scope.
LOCAL_CALLER = ApiKey("local", frozenset(SCOPES), "")

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
# A cross-site HTML form can send multipart/form-data but cannot add a header: an upload must
# carry this one (any value), which makes a browser ask first (CORS), and we never say yes.
UPLOAD_HEADER = "x-requested-by"
# What the audit log keeps of a path or parameter that reached no route: PostgreSQL text holds no
# NUL, and a refused client must not write a row of its choosing length.
AUDIT_TEXT_CHARS = 200
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def audit_text(text: str) -> str:
    """`text` safe for the audit log: control characters escaped, at most AUDIT_TEXT_CHARS."""
    escaped = UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return escaped if len(escaped) <= AUDIT_TEXT_CHARS else escaped[: AUDIT_TEXT_CHARS - 1] + "…"


def error(status: int, field: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"detail": f"{field}: {message}", "errors": [{"field": field, "message": message}]},
        headers=headers,
    )


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a browser's `Origin` is this service as the request reached it (scheme, host, port)."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or not host:
        return False
    default = {"http": 80, "https": 443}
    try:
        origin_port = parts.port or default[parts.scheme]
        served = urlsplit(f"{scheme}://{host}")
        served_port = served.port or default.get(scheme, 80)
    except ValueError:  # a port out of range or not a number
        return False
    return (
        parts.scheme == scheme
        and parts.hostname.lower() == (served.hostname or "").lower()
        and origin_port == served_port
    )


class RefusalLimiter:
    """Refusals per client (its address) in a sliding minute: past the budget, a client's next
    refusal is a 429 with no audit row (a client can fill only its own budget)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self.seen: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def allow(self, client: str) -> float | None:
        """Count a refusal; None while within budget, else the seconds until one is free again."""
        now = self.clock()
        with self.lock:
            if len(self.seen) > 10_000:  # forget idle clients rather than grow without end
                self.seen = {c: t for c, t in self.seen.items() if t and t[-1] > now - 60}
            times = [t for t in self.seen.get(client, []) if t > now - 60]
            if len(times) >= self.per_minute:
                self.seen[client] = times
                return max(1.0, times[0] + 60 - now)
            times.append(now)
            self.seen[client] = times
            return None


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
        routes: list[BaseRoute],
        revoked: Callable[[str], bool] = lambda nonce: False,
    ) -> None:
        self.app = app
        self.settings = settings
        self.keyring = keyring
        self.audit = audit
        self.console = console
        # The app's route table: each request's access is that of the route it reaches.
        self.routes = routes
        self.revoked = revoked
        self.refusals = RefusalLimiter(settings.refusals_per_minute)
        self.local_hosts = {"localhost", "127.0.0.1", "::1", settings.host.lower()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = Headers(scope=scope)
        declared = route_access(self.routes, scope)
        caller, refusal = await self.authenticate(declared, scope, headers)
        if refusal is None:
            refusal = self.check_body_headers(declared, method, path, headers)
        if refusal is None and is_console(path) and method in MUTATING:
            refusal = self.check_csrf_header(headers, scope)
        if refusal is not None:
            client = (scope.get("client") or ("?", 0))[0]
            # Only refusals of who is calling count: bad input is audited under the caller's key.
            wait = self.refusals.allow(client) if refusal.status_code in (401, 403) else None
            if wait is not None:  # over its budget of refusals: no row of its making in the log
                headers_out = {"Retry-After": str(int(wait + 0.999))}
                await error(429, "client", "too many refused requests", headers_out)(scope, receive, send)
                return
            if is_console(path) and isinstance(refusal, JSONResponse):
                first = json.loads(refusal.body)["errors"][0]
                refusal = console_refusal(refusal.status_code, first["field"], first["message"], scope)
            # Written before the answer is sent: a client that saw its refusal finds it in the log.
            await self.record(scope, caller, refusal.status_code)
            await refusal(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        current_settings.set(self.settings)
        cap = declared.cap_bytes(self.settings)
        received = 0
        status = 500

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:
                raise BodyTooLarge
            return message

        recorded = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
                # The row is written before the answer starts: a client that saw its answer finds it.
                recorded = True
                await self.record(scope, caller, status)
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except BodyTooLarge:
            if status == 500:  # nothing sent yet
                await error(413, "body", f"more than {cap} bytes for this route")(
                    scope, receive, tracking_send
                )
        finally:
            if not recorded:  # the app failed before answering
                await self.record(scope, caller, status)

    def cross_site(self, method: str, headers: Headers, scope: Scope) -> JSONResponse | None:
        """A browser's request from a page that is not this service's: refused where it could act
        (mutating requests), and in loopback mode, where no key stands in its way, always."""
        origin = headers.get("origin")
        if origin is None or (method not in MUTATING and self.keyring.enabled):
            return None
        if not same_origin(origin, headers.get("host", ""), scope.get("scheme", "http")):
            return error(
                403, "origin", f"{audit_text(origin)!r} is not this service: cross-site requests are refused"
            )
        return None

    async def authenticate(
        self, declared: Access, scope: Scope, headers: Headers
    ) -> tuple[ApiKey | None, JSONResponse | None]:
        method, path = scope["method"], scope["path"]
        if not self.keyring.enabled:
            host = (headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if host and host not in self.local_hosts:
                return None, error(
                    400, "host", f"{audit_text(host)!r} is not this service's loopback address"
                )
            return LOCAL_CALLER, self.cross_site(method, headers, scope)
        token = bearer_token(headers)
        caller = self.keyring.find(token) if token else None
        if caller is None and is_console(path):
            caller = await self.session_caller(headers)
        if (refusal := self.cross_site(method, headers, scope)) is not None:
            return caller, refusal
        if declared.scope is None:
            return caller, None
        if caller is None:
            return None, error(
                401,
                "authorization",
                "missing or invalid API key (send `Authorization: Bearer <key>`)",
                {"WWW-Authenticate": "Bearer"},
            )
        if not caller.allows(declared.scope):
            return caller, error(
                403, "authorization", f"key {caller.name!r} lacks the {declared.scope!r} scope"
            )
        return caller, None

    async def session_caller(self, headers: Headers) -> ApiKey | None:
        """The key a console session cookie stands for, unless that session was signed out."""
        session = self.console.session(cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE))
        if session is None or await anyio.to_thread.run_sync(self.revoked, session.nonce):
            return None
        return session.key

    def check_body_headers(self, declared: Access, method: str, path: str, headers: Headers) -> Any:
        if method not in MUTATING:
            return None
        length = headers.get("content-length")
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        cap = declared.cap_bytes(self.settings)
        if length is not None and length.isdigit() and int(length) > cap:
            return error(413, "body", f"{int(length)} bytes; at most {cap} for this route")
        if not has_body:
            return None
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if declared.accepts is not None and media not in declared.accepts:
            return error(
                415,
                "content-type",
                f"{audit_text(media) or 'none'}; expected {' or '.join(declared.accepts)}",
            )
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
        cookies = cookie_parser(headers.get("cookie", ""))
        if not self.console.csrf_ok(cookies.get(CSRF_COOKIE), cookies.get(SESSION_COOKIE), token):
            return error(403, "csrf_token", "missing or stale; reload the page")
        scope.setdefault("state", {})["csrf_checked"] = True
        return None

    def route_template(self, scope: Scope) -> str:
        """`/jobs/{job_id}/retry` for `/jobs/7/retry`: a request refused before routing is logged
        under its route's template, as one that reached it is; one that reaches no route under its
        path, escaped and cut short."""
        return template_of(self.routes, scope) or audit_text(scope["path"])

    async def record(self, scope: Scope, caller: ApiKey | None, status: int) -> None:
        """Every mutating call, allowed or not, goes to the audit log (written off the event loop)."""
        if scope["method"] not in MUTATING:
            return
        route = getattr(scope.get("route"), "path", None) or self.route_template(scope)
        if is_console(scope["path"]) and not is_console(route):  # a route of the console's mount
            route = "/ui" + route
        ids = {k: v for k, v in (scope.get("path_params") or {}).items()}
        ids |= (scope.get("state") or {}).get("audit_ids", {})
        entry = {
            "key_name": caller.name if caller else None,
            "method": scope["method"][:8],
            "route": audit_text(route),
            "status": status,
            "ids": {audit_text(str(k)): audit_text(str(v)) for k, v in ids.items()},
        }
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
