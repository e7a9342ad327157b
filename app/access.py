"""Who may call a route, with what body: declared on the route itself, read by the Guard.

Every route, the console's and FastAPI's own documents included, carries an `Access` (the scope it
needs, the content types its body may have, which size cap applies), set with the `access(...)`
decorator under the router's decorator. The Guard (`app/security.py`) finds the route a request
reaches in the app's route table, exactly as the router will, and checks the caller and the
headers against that route's `Access` before a byte of the body is read. So a scope comes from the
matched route, never from the shape of a path, and `undeclared_routes` lets the app refuse to
start (and the tests fail) when a new route declares nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Scope as AsgiScope

from cai_dpo.core.api_keys import Scope
from cai_dpo.core.settings import Settings

JSON = ("application/json",)
YAML = ("application/yaml", "application/x-yaml", "text/yaml")
NDJSON = ("application/x-ndjson", "application/jsonl", "application/json-lines")
MULTIPART = ("multipart/form-data",)
PARQUET = "application/vnd.apache.parquet"
# /datasets/import's binary uploads: a Parquet file, or a Hub dataset folder as a tar.
BINARY = (PARQUET, "application/x-tar")
FORM = ("application/x-www-form-urlencoded",)
# The console's forms: plain posts and uploads (the CSRF token stands in for a custom header).
CONSOLE_FORMS = FORM + MULTIPART

Cap = Literal["body", "constitution", "import"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Access:
    scope: Scope | None  # None: public, no key needed
    accepts: tuple[str, ...] | None = JSON  # None: any (a request that reaches no route reads no body)
    cap: Cap = "body"

    def cap_bytes(self, settings: Settings) -> int:
        return {
            "body": settings.max_body_bytes,
            "constitution": settings.max_constitution_bytes,
            "import": settings.max_import_bytes,
        }[self.cap]


# A request that reaches no route (a 404 or 405 to come) is answered to any valid key, whatever
# its body (which is never read).
UNROUTED = Access("read", accepts=None)
PUBLIC = Access(None)


def access(scope: Scope | None, *, accepts: tuple[str, ...] = JSON, cap: Cap = "body") -> Callable[[F], F]:
    """Declare a route's access: put it under the router's decorator, so it marks the endpoint."""
    declared = Access(scope, accepts, cap)

    def mark(endpoint: F) -> F:
        endpoint.__access__ = declared  # type: ignore[attr-defined]
        return endpoint

    return mark


def declare(target: Any, declared: Access) -> Any:
    """Mark an endpoint or ASGI app that has no decorator of ours (static files, FastAPI's docs)."""
    target.__access__ = declared
    return target


def declared_access(route: BaseRoute) -> Access | None:
    """A route's own declaration: its endpoint's, or a mount's app's."""
    holder = getattr(route, "endpoint", None) or getattr(route, "app", None)
    return getattr(holder, "__access__", None)


def route_access(routes: Iterable[BaseRoute], scope: AsgiScope) -> Access:
    """The access of the route this request reaches (through mounts), or `UNROUTED`."""
    for route in routes:
        match, child = route.matches(scope)
        if match != Match.FULL:
            continue
        inner = getattr(route, "routes", None)
        if isinstance(route, Mount) and inner and declared_access(route) is None:
            return route_access(inner, scope | child)
        return declared_access(route) or UNROUTED
    return UNROUTED


def _routes_with_access(
    routes: Iterable[BaseRoute], prefix: str = ""
) -> Iterator[tuple[BaseRoute, str, Access | None]]:
    """Every route a request can reach, with its full path and its declaration: a mount's inner
    routes, unless the mount itself declares its access (static files)."""
    for route in routes:
        path = prefix + getattr(route, "path", "")
        declared = declared_access(route)
        inner = getattr(route, "routes", None)
        if isinstance(route, Mount) and inner and declared is None:
            yield from _routes_with_access(inner, path)
        else:
            yield route, path, declared


def undeclared_routes(routes: Iterable[BaseRoute]) -> list[str]:
    """Every route (inside mounts too) that declares no access: the app refuses to start with any."""
    return [
        f"{' '.join(sorted(getattr(route, 'methods', None) or []))} {path}".strip()
        for route, path, declared in _routes_with_access(routes)
        if declared is None
    ]


def access_table(routes: Iterable[BaseRoute]) -> dict[tuple[str, str], Access]:
    """(method, path template) -> access, for the OpenAPI document's per-route answers."""
    return {
        (method, path): declared
        for route, path, declared in _routes_with_access(routes)
        if declared is not None
        for method in getattr(route, "methods", None) or []
    }
