"""Prometheus metrics of the API, correct with one uvicorn worker or several.

With several workers each process counts on its own, so a scrape reaching one worker would see
a fraction. When ``PROMETHEUS_MULTIPROC_DIR`` is set (``server.run`` sets it for several
workers) prometheus_client keeps every process's values in files there and ``/metrics`` sums
them. The variable must be set before this module is first imported, and the folder must be
empty when the server starts.
"""

from __future__ import annotations

import os
import time
from functools import cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Tight buckets at the low end: the latency target is a few milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUEST_LATENCY = Histogram(
    "encoder_api_request_duration_seconds",
    "Time from request to the end of the response, per route template and version read.",
    ["route", "method", "status", "version"],
    buckets=LATENCY_BUCKETS,
)
EMBEDDINGS_SERVED = Counter(
    "encoder_api_embeddings_served_total",
    "Embeddings returned, per version and per API key name (who still reads what).",
    ["version", "consumer"],
)
MISSING_USERS = Counter(
    "encoder_api_missing_users_total",
    "Requested users without an embedding under the version read.",
    ["version"],
)
REDIS_ERRORS = Counter(
    "encoder_api_redis_errors_total",
    "Requests that failed on a Redis error, per exception class.",
    ["error"],
)

# Clients choose paths and methods: anything unknown shares one label, so that a scanner cannot
# create series without bound.
_UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def tag_version(request: Request, version: str) -> None:
    """Label the current request's latency with the version it reads."""
    request.state.version = version


@cache
def _served(version: str, consumer: str) -> Counter:
    # ``labels()`` validates and locks on every call; versions and key names are few.
    return EMBEDDINGS_SERVED.labels(version, consumer)


@cache
def _missing(version: str) -> Counter:
    return MISSING_USERS.labels(version)


def record_served(version: str, consumer: str, served: int, missing: int = 0) -> None:
    if served:
        _served(version, consumer).inc(served)
    if missing:
        _missing(version).inc(missing)


def render() -> tuple[bytes, str]:
    """The exposition text of every metric, summed over worker processes when there are several."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Time every HTTP request and label it with its route template, status and version.

    Plain ASGI rather than ``BaseHTTPMiddleware``, which would cost a task and a stream per
    request. The route is known only after routing, from ``scope["route"]`` (whose ``path`` is
    the full template because the routers carry their whole prefix); the version from
    :func:`tag_version`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # As for ``_served``: the set of series is small and fixed.
        self._series: dict[tuple[str, str, str, str], Histogram] = {}

    def _observe(self, labels: tuple[str, str, str, str], seconds: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = REQUEST_LATENCY.labels(*labels)
        series.observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            method = scope["method"]
            labels = (
                route.path if route is not None else _UNMATCHED,
                method if method in _METHODS else "other",
                str(status),
                scope.get("state", {}).get("version", ""),
            )
            self._observe(labels, time.perf_counter() - start)
