"""The application factory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.responses import Response

from signery import __version__
from signery.errors import AuthenticationFailed, SigneryError
from signery.keystores import Keyring, MasterKey
from signery.protocol import API_PREFIX
from signery.server.access.authz import Principal
from signery.server.accounts.routes import router as accounts_router
from signery.server.approvals.routes import router as approvals_router
from signery.server.ca.routes import router as ca_router
from signery.server.ca.subject_policy_routes import router as subject_policy_router
from signery.server.config import Settings, load_settings
from signery.server.connectors.est_routes import router as est_router
from signery.server.connectors.routes import router as ca_connectors_router
from signery.server.container import Core, Services
from signery.server.http.edge import audit_refusal
from signery.server.http.middleware import EdgeMiddleware, Scope
from signery.server.http.problems import install_problem_handlers, problem_response
from signery.server.installation.datadir import require_private
from signery.server.keys.policy_routes import router as key_policy_router
from signery.server.keys.request_routes import router as key_requests_router
from signery.server.keys.routes import keystores_router
from signery.server.keys.routes import router as keys_router
from signery.server.ops.routes import router as ops_router
from signery.server.reports.routes import router as audit_router
from signery.server.runtime.clock import Clock
from signery.server.runtime.logging import configure_logging
from signery.server.signing.routes import SignDispatcher
from signery.server.signing.routes import router as signing_router
from signery.server.tsa.query import MAX_QUERY_BYTES
from signery.server.tsa.routes import router as tsa_router
from signery.server.tsg.routes import router as tsg_router
from signery.server.users.routes import router as users_router


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    master_key: MasterKey | Keyring | None = None,
    core: Core | None = None,
) -> FastAPI:
    """Build a Signery server. Refuses (ConfigurationError) an uninitialized or
    mismatched installation before serving anything. ``core`` lets a caller pass
    its own collaborators (e.g. another key store implementation)."""
    core = core or Core.build(settings, clock=clock, master_key=master_key)
    try:
        services = Services(core)
    except BaseException:
        # A refused start leaves nothing open: no connection, no HSM session.
        core.keystores.close()
        core.db.dispose()
        raise

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            services.stop()

    app = FastAPI(
        title="Signery",
        version=__version__,
        summary="Self-hosted remote code signing",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.services = services
    install_problem_handlers(app)
    # The signing plane first: routes are matched in order, and it is the hot path.
    for router in (
        signing_router,
        accounts_router,
        ops_router,
        tsg_router,
        subject_policy_router,
        users_router,
        keys_router,
        key_policy_router,
        key_requests_router,
        keystores_router,
        ca_router,
        ca_connectors_router,
        est_router,
        tsa_router,
        audit_router,
        approvals_router,
    ):
        app.include_router(router)

    async def on_refused(scope: Scope, error: SigneryError) -> Response:
        """The edge's refusals (413, control characters), audited like any other."""
        conn = HTTPConnection(scope)
        header = conn.headers.get("authorization")
        if header:
            # Attribute the refusal to the caller when its credential is valid.
            try:
                principal: Principal = await anyio.to_thread.run_sync(
                    services.authn.principal, header
                )
                scope.setdefault("state", {})["principal"] = principal
            except AuthenticationFailed:
                pass
        await audit_refusal(services, conn, error)
        return problem_response(
            error, request_id=scope["state"].get("request_id"), path=conn.url.path
        )

    app.add_middleware(
        EdgeMiddleware,
        metrics=services.metrics,
        max_body=settings.max_body_bytes,
        limits_by_prefix={
            f"{API_PREFIX}/signing/": settings.max_sign_body_bytes,
            f"{API_PREFIX}/tsa": MAX_QUERY_BYTES,
        },
        on_refused=on_refused,
        access_log_enabled=settings.access_log,
        fast_route=SignDispatcher(services),
    )
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` worker processes: settings from the environment."""
    settings = load_settings()
    require_private(settings)
    if settings.node_id:
        # Several workers share the configured name: each is a node of its own in
        # the audit trail (its events, its sequence), so it gets its pid appended.
        settings = settings.model_copy(update={"node_id": f"{settings.node_id}:{os.getpid()}"})
    configure_logging(settings.log_level)
    return create_app(settings)
