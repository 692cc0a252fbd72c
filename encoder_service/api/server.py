"""Run the API under uvicorn against the configured Redis, or the embedded one.

The embedded server is started (or attached to) here, in the parent process, so that several
workers share one server that outlives all of them. Workers are separate interpreters: they
learn the server's URL from ``ENCODER_REDIS_URL`` and read every other setting from the
environment too, so settings changed in code only reach a single-worker server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import uvicorn

from encoder_service.api.app import create_app
from encoder_service.api.metrics import MULTIPROC_ENV
from encoder_service.api.slow_clients import IMPORT_PATH, protocol_for
from encoder_service.redis_connection import resolve_redis_url
from encoder_service.settings import Settings

APP_FACTORY = "encoder_service.api.app:create_app"
REDIS_URL_ENV = "ENCODER_REDIS_URL"


def server_options(settings: Settings, *, workers: int = 1) -> dict[str, Any]:
    """uvicorn's options that bound what a slow or idle client can hold: a kept-alive
    connection's idle time, and (by the protocol class) the time to send request headers.

    Several workers take the protocol by import path and read its timeout from the
    environment, like every other setting; one worker gets it bound from ``settings``.
    """
    return {
        "access_log": settings.api_access_log,
        "server_header": False,
        "timeout_keep_alive": settings.api_keep_alive_seconds,
        "http": IMPORT_PATH if workers > 1 else protocol_for(settings),
    }


def run(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); returns after a graceful shutdown."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        **server_options(settings, workers=workers),
    }
    with resolve_redis_url(settings) as url:
        if workers == 1:
            uvicorn.run(create_app(settings.model_copy(update={"redis_url": url})), **options)
            return
        os.environ[REDIS_URL_ENV] = url
        # Each worker counts on its own; with this set, /metrics sums all of them.
        metrics_dir = None
        if not os.environ.get(MULTIPROC_ENV):
            metrics_dir = tempfile.mkdtemp(prefix="encoder-metrics-")
            os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            uvicorn.run(APP_FACTORY, factory=True, workers=workers, **options)
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
                del os.environ[MULTIPROC_ENV]
