"""Freshness benchmark: how long from appending an event until the user's new embedding is readable.

One machine, loopback only. It starts its own Valkey (or uses ``--redis-url``, whose database
must be empty), trains a tiny version on ``--users`` synthetic users and publishes it with their
feature states, then runs the refresher as its own process, exactly as deployed
(``python -m encoder_service.refresher.cli refresh``, default batching settings). Then:

1. **Freshness under load.** For each ``--rates`` value a producer appends events at that rate
   for ``--seconds`` (users drawn from the published ones, 2% brand-new users with a profile),
   and a poller watches a sample of them: an event counts as readable once its user's
   ``meta:{user}`` names an applied entry id at or above the event's. The refresher writes that
   record in the same MULTI/EXEC as the embeddings, so this is the moment a reader sees the new
   vector. Latency runs from just before the append to the poll that saw it (5 ms poll period),
   all on one clock. The refresher's own append-to-commit histogram is reported beside it.
2. **Sustained throughput.** The refresher is paused (SIGSTOP), ``--backlog`` events are
   appended, and it is resumed: events drained per second is what one process sustains.

    python benchmarks/freshness_bench.py --quick                 # about a minute
    python benchmarks/freshness_bench.py --json benchmarks/results/freshness.json
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
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Run from a checkout where the project is not pip-installed: import it from the tree.
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from encoder_service.data.contract import Event  # noqa: E402
from encoder_service.data.synthetic import generate  # noqa: E402
from encoder_service.events import append_events, stream_for, stream_keys  # noqa: E402
from encoder_service.publish import publish_version  # noqa: E402
from encoder_service.redis_connection import start_server, sync_client  # noqa: E402
from encoder_service.refresher.commit import parse_id  # noqa: E402
from encoder_service.store import decode_meta, meta_key  # noqa: E402

VERSION = "bench"
HOST = "127.0.0.1"
TICK_S = 0.02
POLL_S = 0.005
NEW_USER_SHARE = 0.02
READY_TIMEOUT_S = 60.0
TARGET_P99_MS = 1000.0
TARGET_RATE = 500


@dataclass
class Sample:
    user: str
    stream: str
    entry_id: tuple[int, int]
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
def _refresher(url: str, port: int, shards: int, log: Path) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "ENCODER_REDIS_URL": url, "ENCODER_STREAM_SHARDS": str(shards)}
    command = [sys.executable, "-m", "encoder_service.refresher.cli", "refresh"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--metrics-port", str(port), "--consumer", "bench"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            ready = f"http://{HOST}:{port}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=2) as r:
                if r.status == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the refresher did not become ready:\n{log.read_text()}")
            time.sleep(0.1)
        yield process
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(timeout=30)


class Workload:
    """Random events about now: mostly known users, some new ones carrying a profile."""

    def __init__(self, users: list[str], items: list[str], seed: int) -> None:
        self.users = users
        self.items = items
        self.rng = np.random.default_rng(seed)
        self.new_users = 0

    def events(self, n: int) -> list[Event]:
        now = time.time()
        out = []
        for _ in range(n):
            if self.rng.random() < NEW_USER_SHARE:
                self.new_users += 1
                user = f"bench-new-{self.new_users}"
                profile = {"age": float(self.rng.integers(18, 80)), "country": "DE"}
            else:
                user = self.users[int(self.rng.integers(len(self.users)))]
                profile = {}
            item = self.items[int(self.rng.integers(len(self.items)))]
            out.append(Event(user, item, now, event_type="view", profile=profile))
        return out


def _steady_load(
    client: Any, workload: Workload, rate: int, seconds: float, shards: int, sample_every: int
) -> tuple[list[float], int, float]:
    """Append at ``rate`` for ``seconds``; latencies (s) of the sampled events, count, duration."""
    outstanding: list[Sample] = []
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def poll() -> None:
        while not (done.is_set() and not outstanding):
            with lock:
                watch = list(outstanding)
            if watch:
                metas = client.mget([meta_key(s.user) for s in watch])
                seen = time.time()
                finished = set()
                for sample, raw in zip(watch, metas, strict=True):
                    last = decode_meta(raw)[1].get(sample.stream)
                    if last is not None and parse_id(last) >= sample.entry_id:
                        latencies.append(seen - sample.sent)
                        finished.add(id(sample))
                with lock:
                    outstanding[:] = [s for s in outstanding if id(s) not in finished]
            time.sleep(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    appended = 0
    per_tick = rate * TICK_S
    owed = 0.0
    start = time.monotonic()
    next_tick = start
    while time.monotonic() - start < seconds:
        owed += per_tick
        n = int(owed)
        owed -= n
        if n:
            events = workload.events(n)
            sent = time.time()
            ids = append_events(client, events, shards=shards, maxlen=1_000_000)
            with lock:
                for k in range(appended % sample_every, n, sample_every):
                    e = events[k]
                    stream = stream_for(e.user_id, shards)
                    outstanding.append(Sample(e.user_id, stream, parse_id(ids[k]), sent))
            appended += n
        next_tick += TICK_S
        time.sleep(max(0.0, next_tick - time.monotonic()))
    duration = time.monotonic() - start
    done.set()
    poller.join(timeout=30)
    return latencies, appended, duration


def _drained(client: Any, shards: int) -> bool:
    for stream in stream_keys(shards):
        (group,) = client.xinfo_groups(stream)
        if group["pending"] or group["lag"] != 0:
            return False
    return True


def _max_throughput(
    client: Any, process: subprocess.Popen, workload: Workload, backlog: int, shards: int
) -> float:
    """Events per second one refresher process drains from a backlog."""
    process.send_signal(signal.SIGSTOP)
    for start in range(0, backlog, 1000):
        append_events(
            client, workload.events(min(1000, backlog - start)), shards=shards, maxlen=10**7
        )
    started = time.monotonic()
    process.send_signal(signal.SIGCONT)
    while not _drained(client, shards):
        time.sleep(0.01)
    return backlog / (time.monotonic() - started)


def _lag_histogram(port: int) -> dict[float, float]:
    """Cumulative bucket counts of the refresher's append-to-commit lag for the version."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "encoder_refresh_append_lag_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket") and s.labels.get("version") == VERSION:
                buckets[float(s.labels["le"])] = s.value
    return buckets


def _bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of the observations in between."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if total and count >= q * total:
            return bound
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000, help="Published users.")
    parser.add_argument(
        "--rates", type=int, nargs="+", default=[500, 2000], help="Events per second to hold."
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each rate.")
    parser.add_argument("--backlog", type=int, default=50_000, help="Events for the max rate.")
    parser.add_argument("--shards", type=int, default=1, help="Event stream shards.")
    parser.add_argument("--sample-every", type=int, default=4, help="Watch 1 event in N.")
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs of the version.")
    parser.add_argument("--redis-url", help="An empty Redis to use instead of a throwaway one.")
    parser.add_argument("--quick", action="store_true", help="2,000 users, 5 s per rate.")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    args = parser.parse_args()
    if args.quick:
        args.users, args.seconds, args.backlog = 2000, 5.0, 10_000

    figures = Figures()
    table: list[tuple[str, str]] = []
    with _redis(args.redis_url) as url, tempfile.TemporaryDirectory() as models:
        client = sync_client(url)
        if client.dbsize():
            parser.error("--redis-url must name an empty database")
        started = time.perf_counter()
        users, items = _publish(client, args.users, args.epochs, Path(models))
        print(f"trained and published {len(users)} users in {time.perf_counter() - started:.0f}s")
        port = _free_port()
        workload = Workload(users, items, seed=2)
        with _refresher(url, port, args.shards, Path(models) / "refresher.log") as process:
            for rate in args.rates:
                before = _lag_histogram(port)
                latencies, appended, seconds = _steady_load(
                    client, workload, rate, args.seconds, args.shards, args.sample_every
                )
                after = _lag_histogram(port)
                ms = np.asarray(latencies) * 1000
                p50, p99, worst = (float(np.percentile(ms, q)) for q in (50, 99, 100))
                commit_p99 = _bucket_quantile(before, after, 0.99) * 1000
                achieved = appended / seconds
                held = p99 < TARGET_P99_MS
                target = f"p99 < {TARGET_P99_MS:.0f} ms" if rate <= TARGET_RATE else None
                figures.add(f"freshness@{rate}/s.p50", p50, "ms")
                figures.add(
                    f"freshness@{rate}/s.p99",
                    p99,
                    "ms",
                    target,
                    held if target else None,
                )
                figures.add(f"freshness@{rate}/s.max", worst, "ms")
                figures.add(f"freshness@{rate}/s.commit_lag_p99_bucket", commit_p99, "ms")
                figures.add(f"freshness@{rate}/s.achieved_rate", achieved, "events/s")
                figures.add(f"freshness@{rate}/s.samples", len(ms), "count")
                table.append(
                    (
                        f"{rate:>6,}/s  (achieved {achieved:,.0f}/s, {len(ms)} sampled)",
                        f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  max {worst:6.1f} ms  "
                        f"commit-lag p99 <= {commit_p99:.0f} ms",
                    )
                )
            rate = _max_throughput(client, process, workload, args.backlog, args.shards)
            figures.add("max_sustained_rate", rate, "events/s", f">= {max(args.rates)}/s")
            figures.rows[-1]["held"] = rate >= max(args.rates)
            table.append((f"backlog of {args.backlog:,}", f"{rate:,.0f} events/s drained"))

    print(f"\nfreshness: append -> embedding readable ({args.users:,} users, 1 refresher)")
    for left, right in table:
        print(f"  {left:<44} {right}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures.rows, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
