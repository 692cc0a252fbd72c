"""Cross-origin access for browser clients: off unless origins are named.

With no origins configured no CORS header is ever sent, so a browser page on another origin
cannot read any answer, even with a key it holds. Named origins get exactly what the API's
clients need: the methods it serves, the ``Authorization``, ``Content-Type`` and ``Accept``
request headers, and the embedding headers of binary answers. Credentials (cookies) are not
allowed: the API authenticates with bearer keys only.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from encoder_service.api.responses import DIM_HEADER, UPDATED_AT_HEADER, VERSION_HEADER
from encoder_service.settings import Settings

log = logging.getLogger(__name__)

PREFLIGHT_MAX_AGE_S = 600


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Add CORS for ``settings.cors_origins``; with none, add nothing."""
    origins = settings.cors_origin_list
    if not origins:
        return
    if "*" in origins:
        log.warning("CORS allows every origin (ENCODER_CORS_ORIGINS=*): any web page can call")
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "Accept"],
        expose_headers=[VERSION_HEADER, DIM_HEADER, UPDATED_AT_HEADER, "Retry-After"],
        allow_credentials=False,
        max_age=PREFLIGHT_MAX_AGE_S,
    )
