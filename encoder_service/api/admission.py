"""Load shedding: a worker works on at most ``api_max_in_flight`` requests at once.

Past its capacity a server that queues every request makes all of them slow, the ones it could
have answered in time included, and a client that times out retries into the same queue. This
layer refuses the excess at once with 503 ``overloaded`` and ``Retry-After`` instead, so the
requests it accepts keep the latency of a server at capacity, and a client (or the load balancer)
can send the refused ones elsewhere or later.

It sits outside the single-GET fast path, so that path is covered too, and costs it one integer
comparison and a counter: a refusal is answered from bytes built once. Probes and ``/metrics``
are never refused: an overloaded worker is alive and ready, and the scrape shows the overload.
"""

from __future__ import annotations

import orjson
from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from encoder_service.api.problems import OVERLOADED, PROBLEM_JSON

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

SHED = Counter(
    "encoder_api_shed_requests_total",
    "Requests refused with 503 overloaded because the worker had api_max_in_flight in flight.",
)


class AdmissionLimit:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp, *, max_in_flight: int, retry_after_seconds: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        body = orjson.dumps(
            {
                "type": OVERLOADED.uri,
                "title": OVERLOADED.title,
                "status": OVERLOADED.status,
                "detail": f"the server is working on {max_in_flight} requests, its limit; "
                "retry after the delay in Retry-After",
                "limit": max_in_flight,
            }
        )
        self._start = {
            "type": "http.response.start",
            "status": OVERLOADED.status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after_seconds).encode()),
            ],
        }
        self._body = {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan lasts the server's life: never counted
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight and scope["path"] not in EXEMPT_PATHS:
            SHED.inc()
            await send(self._start)
            await send(self._body)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
