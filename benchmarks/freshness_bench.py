"""Freshness benchmark: from appending an event until the REST API serves the user's new embedding.

One machine, loopback only. It starts its own Valkey (or uses ``--redis-url``, whose database
must be empty), trains a tiny version on ``--users`` synthetic users and publishes it with their
feature states, then runs the refresher (one process, or ``--processes N`` pinned to their own
shards) and the API (``encoder-service serve``, auth off) as their own processes, exactly as
deployed. Then:

1. **Freshness under load.** For each ``--rates`` value a producer appends events at that rate
   for ``--seconds`` (users drawn from the published ones, 2% brand-new users with a profile).
   Mixed into the same pipelines, one event per 20 ms tick goes to a *probe* user, a user only
   the probe writes to and that has at most one event in flight. A poller reads the probe users'
   embeddings through the API (``POST /v1/embeddings:batch``, the same store read as ``GET
   /v1/users/{id}/embedding``) every few milliseconds; since nothing else writes a probe user,
   the first response whose ``updated_at`` differs from the last one seen carries that event.
   Latency runs from just before the append to that response, on one clock. Sustained events/s
   is the refresher's own ``applied`` counter over the window; a rate it cannot hold shows as a
   growing backlog and latency, and the run drains before the next rate.
2. **Sustained throughput.** The refresher is paused (SIGSTOP to its process group), ``--backlog``
   events are appended, and it is resumed: events drained per second is what its processes
   sustain with full batches (``--batch-max-events``, default 512), and their CPU time per
   event (from ``/proc``) is what one core sustains whatever else shares the machine.
3. ``--profile`` then drains another backlog in this process under cProfile and prints where a
   batch's time goes.

    python benchmarks/freshness_bench.py --quick                 # about two minutes
    python benchmarks/freshness_bench.py --json benchmarks/results/freshness.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import http.client
import importlib.util
import io
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
# Run from a checkout where the project is not pip-installed: import it from the tree.
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from encoder_service.data.contract import Event  # noqa: E402
from encoder_service.data.synthetic import generate  # noqa: E402
from encoder_service.events import append_events, stream_keys  # noqa: E402
from encoder_service.publish import publish_version  # noqa: E402
from encoder_service.redis_connection import sigterm_unwinds, start_server, sync_client  # noqa: E402
from encoder_service.settings import Settings  # noqa: E402

VERSION = "bench"
HOST = "127.0.0.1"
TICK_S = 0.02
POLL_S = 0.002
NEW_USER_SHARE = 0.02
PROBE_USERS = 200
READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 120.0
TARGET_P99_MS = 100.0
TARGET_RATE = 1000
TARGET_SUSTAINED = 10_000.0


@dataclass
class Probe:
    """A probe user's event in flight: sent just before its append, readable once the API's
    ``updated_at`` for the user differs from ``seen``."""

    user: str
    seen: float | None
    sent: float


@dataclass
class Figures:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        target: str | None = None,
        held: bool | None = None,
    ) -> None:
        self.rows.append(
            {"name": name, "value": value, "unit": unit, "target": target, "held": held}
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    """``n`` consecutive free ports (``refresh --processes n`` serves metrics on port + k)."""
    for _ in range(100):
        first = _free_port()
        ports = list(range(first, first + n))
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    sock = stack.enter_context(socket.socket())
                    sock.bind((HOST, port))
            except OSError:
                continue
        return ports
    raise RuntimeError(f"found no {n} consecutive free ports")


@contextlib.contextmanager
def _redis(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="freshness-bench-") as folder:
        server = start_server(Path(folder), persistent=False)
        try:
            yield server.connection_url
        finally:
            server.stop()


def _publish(client: Any, users: int, epochs: int, folder: Path) -> tuple[list[str], list[str]]:
    """Train and publish a tiny version; returns its user ids and item ids."""
    from encoder_service.training.pipeline import train_version
    from encoder_service.training.train import TrainConfig

    dataset = generate(users, seed=1, mean_events=15.0)
    trained = train_version(
        dataset,
        version=VERSION,
        out_dir=folder,
        config=TrainConfig(embedding_dim=32, epochs=epochs, batch_size=512, seed=1),
        item_vector_dim=16,
        progress=False,
    )
    publish_version(
        client,
        trained.artifacts(),
        trained.user_ids,
        trained.states,
        features=trained.features,
        activate=True,
        progress=False,
    )
    return trained.user_ids, [str(i) for i in dataset.items["item_id"]]


@contextlib.contextmanager
def _refresher(
    url: str, ports: list[int], shards: int, batch: int, wait_ms: int, log: Path
) -> Iterator[subprocess.Popen]:
    """``refresh --processes len(ports)`` in its own process group (so SIGSTOP pauses all of
    its processes); process k serves its metrics on ``ports[k]``, consecutive ports."""
    env = {
        **os.environ,
        "ENCODER_REDIS_URL": url,
        "ENCODER_STREAM_SHARDS": str(shards),
        "ENCODER_BATCH_MAX_EVENTS": str(batch),
        "ENCODER_BATCH_MAX_WAIT_MS": str(wait_ms),
    }
    command = [sys.executable, "-m", "encoder_service.refresher.cli", "refresh"]
    command += ["--metrics-port", str(ports[0]), "--consumer", "bench"]
    if len(ports) > 1:
        command += ["--processes", str(len(ports))]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = list(ports)
        while waiting:
            ready = f"http://{HOST}:{waiting[0]}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=2) as r:
                if r.status == 200:
                    waiting.pop(0)
                    continue
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the refresher did not become ready:\n{log.read_text()}")
            time.sleep(0.1)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(timeout=60)


@contextlib.contextmanager
def _api(url: str, port: int, log: Path) -> Iterator[None]:
    """``encoder-service serve`` on ``port``, auth off, one worker, until the block ends."""
    env = {
        **os.environ,
        "ENCODER_REDIS_URL": url,
        "ENCODER_AUTH_MODE": "none",
        "ENCODER_API_ACCESS_LOG": "false",
    }
    command = [sys.executable, "-m", "encoder_service.cli", "serve", "--host", HOST]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            health = f"http://{HOST}:{port}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


class ApiReader:
    """Reads embeddings' update times through the API over one kept-alive connection."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=10)

    def updated_at(self, users: list[str]) -> dict[str, float]:
        """User -> ``updated_at`` of its embedding, for the users that have one."""
        body = orjson.dumps({"user_ids": users})
        self.connection.request(
            "POST",
            "/v1/embeddings:batch?updated_at=true",
            body,
            {"Content-Type": "application/json"},
        )
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"API answered {response.status}: {payload[:300]!r}")
        return {e["user_id"]: e["updated_at"] for e in orjson.loads(payload)["embeddings"]}


class Workload:
    """Random events about now: mostly known users, some new ones carrying a profile."""

    def __init__(self, users: list[str], items: list[str], seed: int) -> None:
        self.users = users
        self.items = items
        self.rng = np.random.default_rng(seed)
        self.new_users = 0

    def event(self, user: str | None = None) -> Event:
        profile: dict[str, float | str] = {}
        if user is None and self.rng.random() < NEW_USER_SHARE:
            self.new_users += 1
            user = f"bench-new-{self.new_users}"
            profile = {"age": float(self.rng.integers(18, 80)), "country": "DE"}
        elif user is None:
            user = self.users[int(self.rng.integers(len(self.users)))]
        item = self.items[int(self.rng.integers(len(self.items)))]
        return Event(user, item, time.time(), event_type="view", profile=profile)

    def events(self, n: int) -> list[Event]:
        return [self.event() for _ in range(n)]


@dataclass
class LoadResult:
    latencies_ms: np.ndarray
    appended: int
    seconds: float
    applied: float
    unresolved: int


def _steady_load(
    client: Any, workload: Workload, reader_port: int, metrics: list[int], rate: int, args: Any
) -> LoadResult:
    """Append at ``rate`` for ``args.seconds`` with one probe event per tick; wait for the probes
    (and the backlog) to settle."""
    free = [f"bench-probe-{k}" for k in range(PROBE_USERS)]
    # Earlier runs left the probe users with embeddings: start from what the API serves now.
    current = ApiReader(reader_port).updated_at(free)
    seen: dict[str, float | None] = {user: current.get(user) for user in free}
    outstanding: dict[str, Probe] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def poll() -> None:
        reader = ApiReader(reader_port)
        while not done.is_set():
            with lock:
                watch = list(outstanding)
            if watch:
                found = reader.updated_at(watch)
                now = time.time()
                with lock:
                    for user in watch:
                        probe = outstanding[user]
                        updated = found.get(user)
                        if updated is not None and updated != probe.seen:
                            latencies.append(now - probe.sent)
                            seen[user] = updated
                            free.append(user)
                            del outstanding[user]
            time.sleep(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    applied_before = _applied(metrics)
    appended = 0
    owed = 0.0
    start = time.monotonic()
    next_tick = start
    while time.monotonic() - start < args.seconds:
        owed += rate * TICK_S
        n = int(owed)
        owed -= n
        if n:
            events = workload.events(n)
            with lock:
                probe_user = free.pop(0) if free else None
            if probe_user is not None:
                events[-1] = workload.event(probe_user)
            sent = time.time()
            for chunk in range(0, n, 1000):
                append_events(
                    client, events[chunk : chunk + 1000], shards=args.shards, maxlen=10**7
                )
            if probe_user is not None:
                with lock:
                    outstanding[probe_user] = Probe(probe_user, seen[probe_user], sent)
            appended += n
        next_tick += TICK_S
        time.sleep(max(0.0, next_tick - time.monotonic()))
    seconds = time.monotonic() - start
    applied = (_applied(metrics) - applied_before) / seconds
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (outstanding or not _drained(client, args.shards)) and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    poller.join(timeout=30)
    return LoadResult(np.asarray(latencies) * 1000, appended, seconds, applied, len(outstanding))


def _applied(ports: list[int]) -> float:
    """The refreshers' ``encoder_refresh_events_total{outcome="applied"}``, summed."""
    total = 0.0
    for port in ports:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "encoder_refresh_events":
                for s in family.samples:
                    if s.name.endswith("_total") and s.labels.get("outcome") == "applied":
                        total += s.value
    return total


def _drained(client: Any, shards: int) -> bool:
    for stream in stream_keys(shards):
        (group,) = client.xinfo_groups(stream)
        if group["pending"] or group["lag"] != 0:
            return False
    return True


def _cpu_seconds(group: int) -> float:
    """User + system CPU seconds of the processes in process group ``group`` (Linux /proc).

    The machine may be shared, so wall-clock rates move with the neighbours; the refresher's
    own CPU time per event moves much less and says what one core sustains."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # after the name: state ppid pgrp ... utime(11) stime(12)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _max_throughput(
    client: Any, process: subprocess.Popen, workload: Workload, backlog: int, shards: int
) -> tuple[float, float]:
    """Events per second the refresher processes drain from a backlog, and their CPU
    microseconds per event."""
    os.killpg(process.pid, signal.SIGSTOP)
    for start in range(0, backlog, 1000):
        append_events(
            client, workload.events(min(1000, backlog - start)), shards=shards, maxlen=10**7
        )
    cpu = _cpu_seconds(process.pid)
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGCONT)
    while not _drained(client, shards):
        time.sleep(0.01)
    rate = backlog / (time.monotonic() - started)
    return rate, (_cpu_seconds(process.pid) - cpu) / backlog * 1e6


def _profile(client: Any, workload: Workload, backlog: int, args: Any) -> tuple[float, str]:
    """Drain ``backlog`` events with a refresher in this process under cProfile; returns the
    rate (slowed by the profiler) and the top functions by cumulative and own time."""
    from encoder_service.refresher.consumer import Refresher, RefresherConfig
    from encoder_service.refresher.models import LiveVersions
    from encoder_service.settings import get_settings

    config = RefresherConfig.from_settings(get_settings(), shards=args.shards, consumer="profiler")
    config = RefresherConfig(**{**config.__dict__, "batch_max_events": args.batch_max_events})
    versions = LiveVersions(client, poll_seconds=3600)
    versions.reload()
    refresher = Refresher(client, config, versions)
    for start in range(0, backlog, 1000):
        append_events(
            client, workload.events(min(1000, backlog - start)), shards=args.shards, maxlen=10**7
        )
    profiler = cProfile.Profile()
    started = time.monotonic()
    profiler.enable()
    while entries := refresher.read_new():
        refresher.process(entries)
    profiler.disable()
    rate = backlog / (time.monotonic() - started)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    return rate, out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000, help="Published users.")
    parser.add_argument(
        "--rates",
        type=int,
        nargs="+",
        default=[200, 1000, 5000],
        help="Events per second to hold.",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each rate.")
    parser.add_argument("--backlog", type=int, default=50_000, help="Events for the max rate.")
    parser.add_argument(
        "--shards", type=int, default=1, help="Event stream shards (at least --processes)."
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="Refresher processes (refresh --processes), each pinned to its own shards.",
    )
    defaults = Settings()
    parser.add_argument(
        "--batch-max-events",
        type=int,
        default=defaults.batch_max_events,
        help="The refresher's batch size (default: the setting's).",
    )
    parser.add_argument(
        "--batch-max-wait-ms",
        type=int,
        default=defaults.batch_max_wait_ms,
        help="The refresher's batch window (default: the setting's).",
    )
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs of the version.")
    parser.add_argument("--redis-url", help="An empty Redis to use instead of a throwaway one.")
    parser.add_argument("--quick", action="store_true", help="2,000 users, 8 s per rate.")
    parser.add_argument("--profile", action="store_true", help="Also profile a drain (cProfile).")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    args = parser.parse_args()
    if args.quick:
        args.users, args.seconds, args.backlog = 2000, 8.0, 20_000
    args.shards = max(args.shards, args.processes)

    figures = Figures()
    table: list[tuple[str, str]] = []
    with _redis(args.redis_url) as url, tempfile.TemporaryDirectory() as models:
        client = sync_client(url)
        if client.dbsize():
            parser.error("--redis-url must name an empty database")
        started = time.perf_counter()
        users, items = _publish(client, args.users, args.epochs, Path(models))
        print(f"trained and published {len(users)} users in {time.perf_counter() - started:.0f}s")
        metrics = _free_ports(args.processes)
        api_port = _free_port()
        workload = Workload(users, items, seed=2)
        logs = Path(models)
        with (
            _api(url, api_port, logs / "api.log"),
            _refresher(
                url,
                metrics,
                args.shards,
                args.batch_max_events,
                args.batch_max_wait_ms,
                logs / "refresher.log",
            ) as process,
        ):
            for rate in args.rates:
                result = _steady_load(client, workload, api_port, metrics, rate, args)
                ms = result.latencies_ms
                p50, p99, worst = (float(np.percentile(ms, q)) for q in (50, 99, 100))
                achieved = result.appended / result.seconds
                target = f"p99 <= {TARGET_P99_MS:.0f} ms" if rate == TARGET_RATE else None
                held = p99 <= TARGET_P99_MS if target else None
                name = f"freshness@{rate}/s"
                figures.add(f"{name}.p50", p50, "ms")
                figures.add(f"{name}.p99", p99, "ms", target, held)
                figures.add(f"{name}.max", worst, "ms")
                figures.add(f"{name}.offered_rate", achieved, "events/s")
                figures.add(f"{name}.sustained_rate", result.applied, "events/s")
                figures.add(f"{name}.probes", len(ms), "count")
                figures.add(f"{name}.probes_unresolved", result.unresolved, "count")
                table.append(
                    (
                        f"{rate:>6,}/s offered {achieved:7,.0f}/s "
                        f"sustained {result.applied:7,.0f}/s",
                        f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max {worst:7.1f} ms  "
                        f"({len(ms)} probes)",
                    )
                )
                print(table[-1][0], table[-1][1], flush=True)
            rate, cpu_us = _max_throughput(client, process, workload, args.backlog, args.shards)
            figures.add(
                "max_sustained_rate",
                rate,
                "events/s",
                f">= {TARGET_SUSTAINED:,.0f}/s",
                rate >= TARGET_SUSTAINED,
            )
            figures.add("refresher_cpu_per_event", cpu_us, "us")
            table.append(
                (
                    f"backlog of {args.backlog:,} (batch {args.batch_max_events})",
                    f"{rate:,.0f} events/s drained, refresher CPU {cpu_us:.0f} us/event "
                    f"({1e6 / cpu_us:,.0f}/s per core)",
                )
            )
        if args.profile:
            profiled_rate, report = _profile(client, workload, args.backlog, args)
            print(f"\nprofiled drain ({profiled_rate:,.0f} events/s under cProfile):\n{report}")

    print(
        f"\nfreshness: append -> embedding served by the API ({args.users:,} users, "
        f"{args.processes} refresher process(es) over {args.shards} shard(s), "
        f"batch {args.batch_max_events} / {args.batch_max_wait_ms} ms)"
    )
    for left, right in table:
        print(f"  {left:<52} {right}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures.rows, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    with sigterm_unwinds():
        main()
