"""The refresher's small HTTP port: ``/metrics``, ``/readyz`` and ``/healthz``.

The refresher is no web service, so this is the standard library's threaded HTTP server on a
daemon thread rather than an ASGI stack: three read-only endpoints, scraped every few seconds.

``/readyz`` answers 200 with the consumer group's lag and pending count per stream when Redis
answers and at least one live version is loaded, and 503 otherwise (with the reason), so an
orchestrator routes no alerting or rollout through a refresher that refreshes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import redis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from encoder_service.refresher.metrics import observe_group
from encoder_service.refresher.models import LiveVersions

log = logging.getLogger(__name__)

JSON = "application/json"


def readiness(
    client: redis.Redis, group: str, streams: Sequence[str], versions: LiveVersions
) -> tuple[int, dict[str, Any]]:
    """The status code and body of ``/readyz``."""
    try:
        status = observe_group(client, group, streams)
    except (
        redis.ConnectionError,
        redis.TimeoutError,
        redis.exceptions.RedisClusterException,
    ) as exc:
        return 503, {"status": "unavailable", "reason": f"Redis is unreachable: {exc}"}
    loaded = sorted(versions.encoders)
    body: dict[str, Any] = {
        "versions": loaded,
        "refused_versions": dict(versions.refused),
        "lag": sum(s["lag"] or 0 for s in status.values()),
        "pending": sum(s["pending"] or 0 for s in status.values()),
        "streams": status,
    }
    if not loaded:
        return 503, {"status": "not-ready", "reason": "no live version is loaded", **body}
    return 200, {"status": "ready", **body}


class HealthServer:
    """Serves the three endpoints on ``host:port`` from a daemon thread until :meth:`stop`."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        group: str,
        streams: Sequence[str],
        versions: LiveVersions,
        host: str,
        port: int,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
                if self.path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._send(200, b'{"status":"ok"}', JSON)
                elif self.path == "/readyz":
                    code, body = readiness(client, group, streams, versions)
                    self._send(code, orjson.dumps(body), JSON)
                else:
                    self._send(404, b'{"status":"not-found"}', JSON)

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code, HTTPStatus(code).phrase)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug(format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="refresher-health", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port; the one chosen by the system when constructed with 0."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
