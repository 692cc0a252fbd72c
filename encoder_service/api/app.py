"""Build the API: settings, auth, error handling, metrics, routers; the Redis client lives in
the lifespan so that each worker process opens its own pool."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from encoder_service import __version__
from encoder_service.api.admission import AdmissionLimit
from encoder_service.api.auth import Authenticator
from encoder_service.api.body_limit import BodyLimit
from encoder_service.api.cors import install_cors
from encoder_service.api.fastpath import EmbeddingFastPath
from encoder_service.api.metrics import MetricsMiddleware
from encoder_service.api.problems import install_problem_handlers
from encoder_service.api.routes import ROUTERS, events
from encoder_service.api.service import EmbeddingService
from encoder_service.redis_connection import async_client, resolve_redis_url
from encoder_service.settings import Settings, get_settings

DESCRIPTION = """\
User embeddings, served from Redis: one dense vector per user and encoder version.

Reads need an API key with the `read` scope, sent as `Authorization: Bearer <key>`. Errors are
`application/problem+json` (RFC 9457); branch on their `type`."""


def freeze_startup_heap() -> None:
    """Take everything alive after start-up out of the garbage collector's sight.

    A worker holds about 80,000 long-lived objects (modules, routes, pydantic models). Under
    load, requests in flight survive young collections often enough to set off a full
    collection every few seconds, and each one scans all of them: a pause of 20 ms or more that
    lands in the tail latency of every request waiting behind it. Frozen objects are never
    scanned again; what requests allocate is still collected.
    """
    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; without ``settings``, the process-wide ones from the environment.

    Raises:
        ValueError: ``api_keys`` is malformed (refused now rather than per request).
    """
    settings = settings or get_settings()
    authenticator = Authenticator.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with resolve_redis_url(settings) as url, authenticator.reloading_on_sighup():
            client = async_client(url)
            app.state.service = service = EmbeddingService(
                client,
                batch_limit=settings.batch_limit,
                version_cache_ttl=settings.api_version_cache_ttl,
            )
            service.reads.start()
            freeze_startup_heap()
            try:
                yield
            finally:
                gc.unfreeze()  # an app run in-process must not leave its host's heap frozen
                await service.reads.stop()
                await service.store.aclose()
                await client.aclose()

    app = FastAPI(
        title="encoder-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.authenticator = authenticator
    install_problem_handlers(app)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.api_max_body_bytes,
        timeout_seconds=settings.api_body_timeout_seconds,
    )
    app.add_middleware(EmbeddingFastPath)
    # Outside the fast path, so it sheds single GETs too; inside the metrics, so refusals are
    # timed and counted by status like any answer.
    app.add_middleware(
        AdmissionLimit,
        max_in_flight=settings.api_max_in_flight,
        retry_after_seconds=settings.retry_after_seconds,
    )
    app.add_middleware(MetricsMiddleware)  # added last: outermost, so it times the fast path too
    install_cors(app, settings)  # outside everything, so preflights never meet auth
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(events.router)
    return app
