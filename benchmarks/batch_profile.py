"""What one batch request costs the API process, measured in process with no HTTP server.

The load benchmark (``serving_bench.py``) needs two quiet cores: its client, Valkey and the
server share them, so on a busy machine its latencies measure the neighbours. This script
isolates the API's own work instead: it publishes ``--users`` random vectors into its own
Valkey, then calls the whole ASGI app (middleware, auth, routing, validation, the Redis read,
rendering) directly with batch requests of ``--ids`` random ids, one at a time, and reports
per format:

* CPU time of this process per request (``time.process_time``): the minimum and the median over
  rounds of requests, since CPU time is what other processes on the machine disturb least;
* wall time per request, p50 and p99 (Valkey's work and any scheduling delay included);
* the response size.

It also times one full garbage collection of the app's heap before and after ``gc.freeze()``,
the pause that full collections put into tail latency under load.

    python benchmarks/batch_profile.py --json benchmarks/results/batch_profile.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))

from serving_bench import publish, user_ids  # noqa: E402

from encoder_service.api.app import create_app  # noqa: E402
from encoder_service.redis_connection import sigterm_unwinds, start_server  # noqa: E402
from encoder_service.settings import Settings  # noqa: E402

PATH = "/v1/embeddings:batch"
FORMATS = {
    "json": ("application/json", ""),
    "json+updated_at": ("application/json", "updated_at=true"),
    "octet-stream": ("application/octet-stream", ""),
    "octet-stream+updated_at": ("application/octet-stream", "updated_at=true"),
    "npy": ("application/x-npy", ""),
}


@dataclass
class Measured:
    name: str
    cpu_min_ms: float
    cpu_median_ms: float
    wall_p50_ms: float
    wall_p99_ms: float
    body_bytes: int


class AsgiCaller:
    """Calls the app as a server would: one ``http`` scope, the body, a ``send`` that keeps
    the status and the body size."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def post(self, body: bytes, accept: str, query: str) -> tuple[int, int, str]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": PATH,
            "raw_path": PATH.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"accept", accept.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "app": self.app,
        }
        received = False
        answer: dict[str, Any] = {"size": 0, "type": ""}

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                headers = dict(message["headers"])
                answer["type"] = headers.get(b"content-type", b"").decode()
            elif message["type"] == "http.response.body":
                answer["size"] += len(message.get("body", b""))

        await self.app(scope, receive, send)
        return answer["status"], answer["size"], answer["type"]


async def measure(
    caller: AsgiCaller, bodies: list[bytes], name: str, rounds: int, per_round: int
) -> Measured:
    accept, query = FORMATS[name]
    status, size, media_type = await caller.post(bodies[0], accept, query)
    if status != 200 or not media_type.startswith(accept):
        raise RuntimeError(f"{name}: answered {status} {media_type!r}; this build lacks it")
    for body in bodies[:5]:
        await caller.post(body, accept, query)
    cpu: list[float] = []
    wall: list[float] = []
    for r in range(rounds):
        started_cpu = time.process_time()
        for k in range(per_round):
            started = time.perf_counter()
            await caller.post(bodies[(r * per_round + k) % len(bodies)], accept, query)
            wall.append(time.perf_counter() - started)
        cpu.append((time.process_time() - started_cpu) / per_round)
    wall.sort()
    return Measured(
        name,
        min(cpu) * 1e3,
        statistics.median(cpu) * 1e3,
        wall[len(wall) // 2] * 1e3,
        wall[min(len(wall) - 1, int(len(wall) * 0.99))] * 1e3,
        size,
    )


def full_collection_ms() -> float:
    started = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - started) * 1e3


async def run(args: argparse.Namespace, redis_url: str, home: Path) -> list[dict[str, Any]]:
    ids = user_ids(args.users)
    matrix = np.random.default_rng(0).standard_normal((args.users, args.dim)).astype(np.float32)
    publish(redis_url, ids, matrix)
    rng = np.random.default_rng(1)
    bodies = [
        json.dumps({"user_ids": [ids[i] for i in rng.integers(0, args.users, args.ids)]}).encode()
        for _ in range(64)
    ]
    app = create_app(
        Settings(redis_url=redis_url, auth_mode="none", home=home, batch_limit=args.ids)  # type: ignore[call-arg]
    )
    caller = AsgiCaller(app)
    figures: list[dict[str, Any]] = []

    def figure(name: str, value: float, unit: str) -> None:
        figures.append({"name": name, "value": value, "unit": unit, "target": None, "held": None})

    columns = ("CPU min", "CPU med", "wall p50", "wall p99", "bytes")
    print(f"{'format':<26} " + " ".join(f"{c:>9}" for c in columns))
    async with app.router.lifespan_context(app):
        frozen = gc.get_freeze_count()
        gc.unfreeze()  # measure the collection the heap costs without the freeze ...
        unfrozen_ms = full_collection_ms()
        gc.freeze()  # ... and with it, as the app runs
        frozen_ms = full_collection_ms()
        for name in args.formats:
            m = await measure(caller, bodies, name, args.rounds, args.per_round)
            print(
                f"{m.name:<26} {m.cpu_min_ms:>7.2f}ms {m.cpu_median_ms:>7.2f}ms "
                f"{m.wall_p50_ms:>7.2f}ms {m.wall_p99_ms:>7.2f}ms {m.body_bytes:>9,}",
                flush=True,
            )
            figure(f"batch_{args.ids}.{name}.cpu_min", m.cpu_min_ms, "ms")
            figure(f"batch_{args.ids}.{name}.cpu_median", m.cpu_median_ms, "ms")
            figure(f"batch_{args.ids}.{name}.wall_p50", m.wall_p50_ms, "ms")
            figure(f"batch_{args.ids}.{name}.wall_p99", m.wall_p99_ms, "ms")
            figure(f"batch_{args.ids}.{name}.body", m.body_bytes, "bytes")
    print(
        f"\nfull garbage collection of the app's heap: {unfrozen_ms:.2f} ms, "
        f"{frozen_ms:.3f} ms once frozen ({frozen:,} objects frozen at start-up)"
    )
    figure("gc_full_collection", unfrozen_ms, "ms")
    figure("gc_full_collection_frozen", frozen_ms, "ms")
    figure("gc_frozen_objects", frozen, "objects")
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000, help="Users published.")
    parser.add_argument("--dim", type=int, default=64, help="Embedding dimension.")
    parser.add_argument("--ids", type=int, default=1000, help="Ids per batch request.")
    parser.add_argument("--rounds", type=int, default=15, help="Rounds per format.")
    parser.add_argument("--per-round", type=int, default=20, help="Requests per round.")
    parser.add_argument(
        "--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS), help="Formats."
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="Write every figure here.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batch-profile-") as tmp_name:
        tmp = Path(tmp_name)
        valkey = start_server(tmp / "valkey", persistent=False)
        try:
            figures = asyncio.run(run(args, valkey.connection_url, tmp / "home"))
        finally:
            valkey.stop()
    figures.append(
        {
            "name": "load_average_1min_at_end",
            "value": os.getloadavg()[0],
            "unit": "processes",
            "target": None,
            "held": None,
        }
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with sigterm_unwinds():
        sys.exit(main())
