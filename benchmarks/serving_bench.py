"""Serving benchmark: this service against a bare ASGI ceiling and Feast, side by side.

One run on one machine, loopback only. It starts its own Valkey, publishes random ``--dim``
vectors for ``--users`` users (no training: serving cost does not depend on where vectors came
from), writes the same vectors for the same users into Feast's Redis online store, then loads
each server in turn from a separate load-generator process:

1. the service's single-user GET, JSON and raw float32, with 1 and 2 uvicorn workers;
2. a raw ASGI app doing the same single Redis GET under the same uvicorn (the framework
   ceiling: what any Python service could reach here);
3. Feast 0.67's HTTP feature server (gunicorn, the same worker counts, worker recycling off)
   and its Python SDK in process;
4. the service's batch endpoint with 100 and 1,000 ids, JSON, and 1,000 ids as one binary
   float32 matrix (``Accept: application/octet-stream``, the adapter client's bulk format).

Throughput comes from a closed loop (``wrk`` when installed, else an asyncio client), latency
at a set load from an open loop paced at half the service's measured maximum, counted from each
request's scheduled send time. Method and results: docs/benchmarks.md, section "Serving".

    python benchmarks/serving_bench.py --quick          # smoke run, about two minutes
    python benchmarks/serving_bench.py --json benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
# Run from a checkout where the project is not pip-installed: import it from the tree.
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))

from serving import feast_setup, loadgen  # noqa: E402
from serving.loadgen import LoadResult, RequestSpec  # noqa: E402

from encoder_service.redis_connection import sigterm_unwinds, start_server, sync_client  # noqa: E402
from encoder_service.registry import Registry  # noqa: E402
from encoder_service.store import EmbeddingStore  # noqa: E402

HOST = "127.0.0.1"
VERSION = "bench"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
PACED_CONNECTIONS = 64
PACED_FRACTION = 0.5
BUSY_LOAD = 0.5  # a 1-min load average above this means someone else is running

TARGET_VS_FEAST = 3.0
TARGET_VS_BARE = 0.5
TARGET_PACED_P99_MS = 5.0
TARGET_BATCH_P99_MS = 15.0

GET_PATH = "/v1/users/{id}/embedding"
BINARY = (("Accept", "application/octet-stream"),)
SPECS: dict[str, RequestSpec] = {
    "get_json": RequestSpec("GET", GET_PATH),
    "get_binary": RequestSpec("GET", GET_PATH, headers=BINARY),
    "batch_100": RequestSpec(
        "POST", "/v1/embeddings:batch", body='{"user_ids": {ids}}', ids_per_request=100
    ),
    "batch_1000": RequestSpec(
        "POST", "/v1/embeddings:batch", body='{"user_ids": {ids}}', ids_per_request=1000
    ),
    "batch_1000_binary": RequestSpec(
        "POST",
        "/v1/embeddings:batch",
        body='{"user_ids": {ids}}',
        headers=BINARY,
        ids_per_request=1000,
    ),
    "feast": RequestSpec(
        "POST",
        "/get-online-features",
        body='{"features": ["user_embedding:embedding"], "entities": {"user_id": {ids}}}',
    ),
}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    case: str
    workers: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    note: str = ""


@dataclass
class Check:
    """A figure with a target: a ratio or a latency bound."""

    name: str
    value: float
    unit: str
    target: str
    held: bool


@dataclass
class Report:
    """Everything measured, printed as it comes and as two Markdown tables at the end."""

    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)

    def add_figure(
        self,
        name: str,
        value: float,
        unit: str,
        target: str | None = None,
        held: bool | None = None,
    ) -> None:
        self.figures.append(
            {"name": name, "value": value, "unit": unit, "target": target, "held": held}
        )

    def add_row(self, key: str, row: Row) -> None:
        self.rows.append(row)
        self.add_figure(f"{key}.rps", row.rps, "req/s")
        self.add_figure(f"{key}.p50", row.p50_ms, "ms")
        self.add_figure(f"{key}.p99", row.p99_ms, "ms")
        self.add_figure(f"{key}.errors", row.errors, "count")
        print(
            f"  {row.case:<44} {row.workers:>8}  {row.rps:>9,.0f} req/s  p50 {row.p50_ms:7.2f}"
            f"  p99 {row.p99_ms:7.2f} ms  errors {row.errors}  {row.note}",
            flush=True,
        )

    def add_check(self, check: Check) -> None:
        self.checks.append(check)
        self.add_figure(check.name, check.value, check.unit, check.target, check.held)

    def table(self) -> str:
        lines = [
            "| case | workers | req/s | p50 ms | p99 ms | errors | notes |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r.case} | {r.workers} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |"
            f" {r.errors} | {r.note} |"
            for r in self.rows
        ]
        lines += ["", "| target | measured | wanted | held |", "|---|---:|---:|---|"]
        lines += [
            f"| {c.name} | {c.value:.2f}{'x' if c.unit == 'ratio' else ' ms'} | {c.target} |"
            f" {'yes' if c.held else '**no**'} |"
            for c in self.checks
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http(
    port: int, path: str, *, body: bytes | None = None, accept: str | None = None
) -> tuple[int, bytes]:
    """One request with the standard library; for readiness and correctness checks only."""
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def server(
    name: str, cmd: list[str], port: int, ready_path: str, env: dict[str, str], log_dir: Path
) -> Iterator[None]:
    """Run ``cmd`` in a session of its own until the block ends; wait for ``ready_path``.

    A session of its own lets the whole process tree (uvicorn's or gunicorn's workers) be
    stopped by signalling its group, which holds only processes this benchmark started.
    """
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(OSError):
                if http(port, ready_path)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} not ready in {READY_TIMEOUT_S:.0f} s:\n{_tail(log_path)}"
                )
            time.sleep(0.2)
        yield
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Workers may outlive the master by a moment; make sure none keeps a core busy.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def python_env(redis_url: str, home: Path, dim: int) -> dict[str, str]:
    """The environment of every server: the tree on PYTHONPATH, our Valkey, auth off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(
        {
            "ENCODER_REDIS_URL": redis_url,
            "ENCODER_AUTH_MODE": "none",
            "ENCODER_HOME": str(home),
            "BARE_REDIS_URL": redis_url,
            "BARE_VERSION": VERSION,
            "BARE_DIM": str(dim),
        }
    )
    env.pop("REDIS_URL", None)
    return env


def service_cmd(port: int, workers: int) -> list[str]:
    """``encoder-service serve`` as shipped, run through this interpreter.

    Calling the CLI's Typer app works whether or not the project is pip-installed (the
    ``encoder-service`` script exists only when it is).
    """
    return [
        sys.executable,
        "-c",
        "from encoder_service.cli import app; app()",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def bare_cmd(port: int, workers: int) -> list[str]:
    """The ceiling under the uvicorn settings a fast service would use: uvloop, httptools."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "serving.bare_asgi:app",
        "--app-dir",
        str(BENCH_DIR),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def user_ids(count: int) -> list[str]:
    return [f"u{i:07d}" for i in range(count)]


def publish(redis_url: str, ids: list[str], matrix: np.ndarray) -> None:
    """Register and promote version ``bench`` and store one vector per user, as a publish does.

    The model and catalogue artefacts are placeholders: serving reads neither.
    """
    client = sync_client(redis_url)
    registry = Registry(client)
    manifest = {
        "version": VERSION,
        "embedding_dim": int(matrix.shape[1]),
        "dtype": "float32",
        "schema_hash": "serving-bench",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    registry.register(manifest, b"", b"", by="serving-bench")
    EmbeddingStore(client).write_embeddings(VERSION, ids, matrix, dtype="float32")
    registry.promote(VERSION, by="serving-bench")
    client.close()


# --------------------------------------------------------------------------------------------
# Correctness: every server must return the published vector before it is timed
# --------------------------------------------------------------------------------------------


def _same(vector: Any, expected: np.ndarray, what: str) -> None:
    got = np.asarray(vector, dtype=np.float32)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-6, atol=1e-6):
        raise RuntimeError(f"{what} returned a wrong vector")


def check_single(port: int, ids: list[str], matrix: np.ndarray, what: str) -> None:
    i = len(ids) // 3
    status, body = http(port, GET_PATH.replace("{id}", ids[i]))
    if status != 200:
        raise RuntimeError(f"{what} GET answered {status}: {body[:300]!r}")
    _same(json.loads(body)["embedding"], matrix[i], f"{what} GET (JSON)")
    status, body = http(port, GET_PATH.replace("{id}", ids[i]), accept="application/octet-stream")
    if status != 200:
        raise RuntimeError(f"{what} binary GET answered {status}: {body[:300]!r}")
    _same(np.frombuffer(body, dtype="<f4"), matrix[i], f"{what} GET (binary)")


def check_batch(port: int, ids: list[str], matrix: np.ndarray) -> None:
    chosen = [1, len(ids) // 2, len(ids) - 1]
    payload = json.dumps({"user_ids": [ids[i] for i in chosen]}).encode()
    status, body = http(port, "/v1/embeddings:batch", body=payload)
    if status != 200:
        raise RuntimeError(f"batch answered {status}: {body[:300]!r}")
    items = json.loads(body)["embeddings"]
    by_user = {item["user_id"]: item["embedding"] for item in items}
    for i in chosen:
        _same(by_user[ids[i]], matrix[i], "service batch")
    status, body = http(
        port, "/v1/embeddings:batch", body=payload, accept="application/octet-stream"
    )
    if status != 200:
        raise RuntimeError(f"binary batch answered {status}: {body[:300]!r}")
    rows = np.frombuffer(body, dtype="<f4").reshape(len(chosen), -1)
    _same(rows, matrix[chosen], "service batch (binary)")


def check_feast(port: int, ids: list[str], matrix: np.ndarray) -> None:
    i = len(ids) // 3
    payload = json.dumps(
        {"features": ["user_embedding:embedding"], "entities": {"user_id": [ids[i]]}}
    ).encode()
    status, body = http(port, "/get-online-features", body=payload)
    if status != 200:
        raise RuntimeError(f"Feast answered {status}: {body[:300]!r}")
    answer = json.loads(body)
    column = answer["metadata"]["feature_names"].index("embedding")
    _same(answer["results"][column]["values"][0], matrix[i], "Feast feature server")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """The run's settings and the helpers that load one server with one kind of request."""

    args: argparse.Namespace
    ids_file: Path
    use_wrk: bool
    report: Report

    def closed(self, port: int, spec: RequestSpec) -> LoadResult:
        """Saturation throughput: ``--connections`` connections back to back."""
        a = self.args
        if self.use_wrk:
            url = f"http://{HOST}:{port}"
            loadgen.run_wrk(
                url, spec, self.ids_file, connections=a.connections, duration_s=a.warmup
            )
            return loadgen.run_wrk(
                url, spec, self.ids_file, connections=a.connections, duration_s=a.duration
            )
        return loadgen.run_client(
            loadgen.client_argv(
                "closed",
                port,
                spec,
                self.ids_file,
                connections=a.connections,
                duration_s=a.duration,
                warmup_s=a.warmup,
            )
        )

    def paced(self, port: int, spec: RequestSpec, rate: float) -> LoadResult:
        """Latency at a fixed offered load, free of coordinated omission."""
        a = self.args
        return loadgen.run_client(
            loadgen.client_argv(
                "paced",
                port,
                spec,
                self.ids_file,
                connections=PACED_CONNECTIONS,
                duration_s=a.duration,
                warmup_s=a.warmup,
                rate=rate,
            )
        )

    def row(
        self, key: str, case: str, workers: int | str, result: LoadResult, note: str = ""
    ) -> LoadResult:
        self.report.add_row(
            key,
            Row(case, str(workers), result.rps, result.p50_ms, result.p99_ms, result.errors, note),
        )
        return result


# Run in this order, so that each service case sits next to its baselines in time: a change in
# background load then moves both sides of a ratio alike.
CLOSED_CASES = (
    ("service", "get_json", "service GET, JSON"),
    ("bare", "get_json", "bare ASGI GET, JSON (ceiling)"),
    ("feast", "feast", "Feast feature server, 1 entity"),
    ("service", "get_binary", "service GET, octet-stream"),
    ("bare", "get_binary", "bare ASGI GET, octet-stream (ceiling)"),
    ("service", "batch_100", "service batch, 100 ids"),
    ("service", "batch_1000", "service batch, 1,000 ids"),
    ("service", "batch_1000_binary", "service batch, 1,000 ids, octet-stream"),
)
# (server, request, label): each paced at half the service's closed-loop maximum for that
# request. The bare app at the service's rate is the control: the p99 this machine and client
# give at that load with no framework at all.
PACED_CASES = (
    ("service", "get_json", "service GET, JSON, at 50% of max"),
    ("bare", "get_json", "bare ASGI GET, JSON, at the same rate (control)"),
    ("service", "batch_1000", "service batch, 1,000 ids, at 50% of max"),
    ("service", "batch_1000_binary", "service batch, 1,000 ids, octet-stream, at 50% of max"),
)


def bench_workers(bench: Bench, workers: int, ports: dict[str, int]) -> dict[str, LoadResult]:
    """Every case at one worker count, against servers already running on ``ports``."""
    results: dict[str, LoadResult] = {}
    for name, key, label in CLOSED_CASES:
        if name in ports:
            result = bench.closed(ports[name], SPECS[key])
            results[f"{name}_{key}"] = bench.row(f"{name}_{key}.w{workers}", label, workers, result)
    for name, key, label in PACED_CASES:
        rate = max(1.0, results[f"service_{key}"].rps * PACED_FRACTION)
        paced = bench.paced(ports[name], SPECS[key], rate)
        note = (
            f"open loop at {rate:,.0f}/s; client send lag p99 "
            f"{paced.extra['send_lag_p99_ms']:.2f} ms, p99 from actual send "
            f"{paced.extra['service_p99_ms']:.2f} ms"
        )
        figure = f"{name}_{key}_paced.w{workers}"
        results[f"{name}_{key}_paced"] = bench.row(figure, label, workers, paced, note)
        bench.report.add_figure(f"{figure}.rate", rate, "req/s")
        bench.report.add_figure(f"{figure}.send_lag_p99", paced.extra["send_lag_p99_ms"], "ms")
        bench.report.add_figure(
            f"{figure}.client_dispatch_lag_p99", paced.extra["dispatch_lag_p99_ms"], "ms"
        )
        bench.report.add_figure(f"{figure}.p99_from_send", paced.extra["service_p99_ms"], "ms")
    return results


def add_checks(report: Report, workers: int, results: dict[str, LoadResult]) -> None:
    """The targets at one worker count."""

    def at_least(name: str, value: float, target: float) -> None:
        report.add_check(Check(name, value, "ratio", f">= {target:g}x", value >= target))

    def at_most(name: str, value: float, target: float) -> None:
        report.add_check(Check(name, value, "ms", f"<= {target:g} ms", value <= target))

    rps = {key: result.rps for key, result in results.items()}
    suffix = f"{workers} worker{'s' if workers > 1 else ''}"
    if "feast_feast" in rps:
        at_least(
            f"service GET / Feast server, {suffix}",
            rps["service_get_json"] / rps["feast_feast"],
            TARGET_VS_FEAST,
        )
    for key, label in (("get_json", "JSON"), ("get_binary", "octet-stream")):
        at_least(
            f"service / bare ASGI, {label}, {suffix}",
            rps[f"service_{key}"] / rps[f"bare_{key}"],
            TARGET_VS_BARE,
        )
    at_most(
        f"GET p99 at 50% of max, {suffix}",
        results["service_get_json_paced"].p99_ms,
        TARGET_PACED_P99_MS,
    )
    for key, label in (("batch_1000", "JSON"), ("batch_1000_binary", "octet-stream")):
        at_most(
            f"batch 1,000 p99 at 50% of max, {label}, {suffix}",
            results[f"service_{key}_paced"].p99_ms,
            TARGET_BATCH_P99_MS,
        )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Needs two free cores to mean anything; run nothing else meanwhile.",
    )
    parser.add_argument(
        "--users", type=int, help="Users published (default 100,000; quick 10,000)."
    )
    parser.add_argument("--dim", type=int, default=64, help="Embedding dimension.")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="Worker counts of every server."
    )
    parser.add_argument(
        "--duration", type=float, help="Measured seconds per case (default 10; quick 3)."
    )
    parser.add_argument(
        "--warmup", type=float, help="Unmeasured seconds before each case (default 2; quick 1)."
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="Connections of the closed-loop load generator."
    )
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="Closed-loop driver: wrk if installed (auto), or the asyncio client.",
    )
    parser.add_argument(
        "--feast-venv",
        type=Path,
        default=feast_setup.default_venv(),
        help="Virtualenv for Feast, created on first use (default: %(default)s).",
    )
    parser.add_argument("--no-feast", action="store_true", help="Skip the Feast cases.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: fewer users, short cases (about two minutes).",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="Write every printed figure as {name, value, unit, target, held}.",
    )
    args = parser.parse_args(argv)
    args.users = args.users or (10_000 if args.quick else 100_000)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    if args.loadgen == "wrk" and not loadgen.wrk_available():
        parser.error("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    return args


@dataclass
class World:
    """What the servers share in one run: the data, its files, the Feast repo, environments."""

    tmp: Path
    ids: list[str]
    matrix: np.ndarray
    ids_file: Path
    env: dict[str, str]
    feast_python: Path | None
    feast_repo: Path


def prepare(args: argparse.Namespace, tmp: Path, redis_url: str, redis_port: int) -> World:
    """Publish the vectors to the service's layout and, unless skipped, to Feast's."""
    ids = user_ids(args.users)
    matrix = np.random.default_rng(0).standard_normal((args.users, args.dim)).astype(np.float32)
    ids_file = tmp / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    started = time.perf_counter()
    publish(redis_url, ids, matrix)
    print(
        f"published {args.users:,} x {args.dim} float32 vectors in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    world = World(
        tmp=tmp,
        ids=ids,
        matrix=matrix,
        ids_file=ids_file,
        env=python_env(redis_url, tmp / "home", args.dim),
        feast_python=None if args.no_feast else feast_setup.ensure_venv(args.feast_venv),
        feast_repo=tmp / "feast_repo",
    )
    if world.feast_python is not None:
        np.save(tmp / "vectors.npy", matrix)
        feast_setup.write_repo(world.feast_repo, HOST, redis_port, args.dim)
        seconds = feast_setup.apply_and_load(
            world.feast_python, world.feast_repo, ids_file, tmp / "vectors.npy"
        )
        print(f"Feast: wrote the same vectors with write_to_online_store in {seconds:.1f} s")
    return world


def start_servers(stack: contextlib.ExitStack, world: World, workers: int) -> dict[str, int]:
    """Start the service, the bare app and Feast with ``workers`` workers; check their answers.

    All three run at once and are loaded one at a time: an idle server costs no CPU.
    """
    ports = {"service": free_port(), "bare": free_port()}
    port = ports["service"]
    stack.enter_context(
        server(
            f"service-w{workers}", service_cmd(port, workers), port, "/readyz", world.env, world.tmp
        )
    )
    check_single(port, world.ids, world.matrix, "service")
    check_batch(port, world.ids, world.matrix)
    port = ports["bare"]
    stack.enter_context(
        server(f"bare-w{workers}", bare_cmd(port, workers), port, "/readyz", world.env, world.tmp)
    )
    check_single(port, world.ids, world.matrix, "bare ASGI")
    if world.feast_python is not None:
        port = ports["feast"] = free_port()
        cmd = feast_setup.serve_command(world.feast_python, world.feast_repo, port, workers)
        # Feast's own virtualenv must not see this project's tree on its path.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        stack.enter_context(server(f"feast-w{workers}", cmd, port, "/health", env, world.tmp))
        check_feast(port, world.ids, world.matrix)
    return ports


def run(args: argparse.Namespace, report: Report) -> None:
    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and loadgen.wrk_available())
    print(
        f"load generator: {'wrk (1 thread)' if use_wrk else 'asyncio client'}, "
        f"{args.connections} connections, {args.warmup:g} s warm-up + {args.duration:g} s a case",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        valkey = start_server(tmp / "valkey", persistent=False)
        try:
            world = prepare(args, tmp, valkey.connection_url, valkey.port)
            bench = Bench(args, world.ids_file, use_wrk, report)
            for workers in args.workers:
                with contextlib.ExitStack() as stack:
                    ports = start_servers(stack, world, workers)
                    add_checks(report, workers, bench_workers(bench, workers, ports))
            if world.feast_python is not None:
                sdk = feast_setup.sdk_latency(
                    world.feast_python, world.feast_repo, world.ids_file, args.duration
                )
                row = Row(
                    "Feast SDK get_online_features, in process",
                    "1 thread",
                    sdk["calls_per_s"],
                    sdk["p50_ms"],
                    sdk["p99_ms"],
                )
                report.add_row("feast_sdk", row)
        finally:
            valkey.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report()
    started = time.monotonic()
    load_1min = os.getloadavg()[0]
    report.add_figure("load_average_1min_at_start", load_1min, "processes")
    if load_1min > BUSY_LOAD:
        print(
            f"warning: load average {load_1min:.1f} at start: other processes share the cores "
            "and every figure below is lower than this machine can do",
            flush=True,
        )
    run(args, report)
    elapsed = time.monotonic() - started
    report.add_figure("elapsed", elapsed, "s")
    report.add_figure("load_average_5min_at_end", os.getloadavg()[1], "processes")
    print(
        f"\n{report.table()}\n\nelapsed {elapsed:.0f} s; load average over the last 5 min "
        f"{os.getloadavg()[1]:.2f} (includes this benchmark's own processes)",
        flush=True,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with sigterm_unwinds():
        sys.exit(main())
