"""The FastAPI application factory: security, routers, the console, error handlers, metrics, the database."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from app.access import Access, access_table, declare, undeclared_routes
from app.errors import install_error_handlers
from app.metrics import RequestCounter, metrics_registry
from app.openapi import install as install_openapi
from app.routes import admin, constitutions, datasets, export, health, jobs, judges, pairs, training, workers
from app.security import Guard
from app.ui.router import install_console
from cai_dpo.core.api_keys import KeyRing
from cai_dpo.core.constitutions import ConstitutionStore
from cai_dpo.core.db import database_url, get_engine, session_scope, upgrade_database
from cai_dpo.core.queries import audit as audit_queries
from cai_dpo.core.queries import sessions as session_queries
from cai_dpo.core.settings import Settings, check_bind, get_settings


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    settings = settings or get_settings()
    check_bind(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        url = database_url(settings)
        if migrate:
            upgrade_database(url)
        app.state.engine = get_engine(settings, pool_size=settings.db_pool_size)
        app.state.export_engine = get_engine(settings, pool_size=settings.export_concurrency, streaming=True)
        yield
        app.state.engine.dispose()
        app.state.export_engine.dispose()

    app = FastAPI(
        title="cai-dpo",
        summary="Constitutional-AI preference data and DPO training as a service.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.constitutions = ConstitutionStore(
        settings.constitutions_dir, max_bytes=settings.max_constitution_bytes
    )
    app.state.keys = KeyRing(settings.api_keys, settings.api_keys_file)
    app.state.export_slots = threading.BoundedSemaphore(settings.export_concurrency)
    install_error_handlers(app)
    install_openapi(app, settings)
    for module in (health, constitutions, jobs, pairs, export, workers, training, judges, datasets, admin):
        app.include_router(module.router)
    # The web console: its pages, forms and assets under one mount, outside the API's schema.
    install_console(app)
    # FastAPI's own pages (the OpenAPI document and its viewers) read like any GET.
    for route in app.routes:
        if getattr(route, "path", None) in (
            app.openapi_url,
            app.docs_url,
            app.redoc_url,
            app.swagger_ui_oauth2_redirect_url,
        ):
            declare(route.endpoint, Access("read"))
    if missing := undeclared_routes(app.routes):
        raise RuntimeError(f"routes that declare no access (app/access.py): {', '.join(missing)}")
    app.state.access = access_table(app.routes)

    def write_audit(entry: dict[str, Any]) -> None:
        with session_scope(app.state.engine) as session:
            audit_queries.record(session, **entry)

    def revoked(nonce: str) -> bool:
        with session_scope(app.state.engine) as session:
            return session_queries.is_revoked(session, nonce)

    # Added last is outermost: the Guard decides before anything reads the body.
    app.state.metrics, requests = metrics_registry(lambda: app.state.engine, settings.worker_seen_seconds)
    app.add_middleware(RequestCounter, counter=requests)
    if not app.state.keys.enabled:  # loopback mode: only loopback host names
        app.add_middleware(
            TrustedHostMiddleware, allowed_hosts=["localhost", "127.0.0.1", "[::1]", settings.host]
        )
    app.add_middleware(
        Guard,
        settings=settings,
        keyring=app.state.keys,
        audit=write_audit,
        console=app.state.console_auth,
        routes=app.router.routes,
        revoked=revoked,
    )
    return app
