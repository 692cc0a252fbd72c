"""Soak benchmark: the API at half its measured maximum and the refresher at 500 events/s, for a
bounded time, watching for what only shows over minutes: errors, a p99 that creeps up, memory
that grows, a Redis that fills.

One machine, loopback only. It starts its own Valkey (or uses ``--redis-url``, whose database
must be empty), trains and publishes a tiny version with ``--users`` users' feature states, and
runs the API (``encoder-service serve``, one worker, auth off) and ONE refresher as their own
processes, exactly as deployed, with the event streams capped at ``--stream-maxlen`` entries.

1. **Maximum load.** A closed loop of single-user GETs for ``--max-seconds`` measures the
   API's requests/s (or ``--max-rps`` gives it).
2. **Soak.** For ``--minutes``: single-user GETs paced at ``--load-fraction`` of that maximum
   (open loop: latency counted from when each request was due), in windows of
   ``--window-seconds``, each window one run of the load client; meanwhile a producer appends
   ``--events-per-second`` events for the published users, and a sampler records every few
   seconds the resident memory (RSS) of the API and the refresher, Redis ``used_memory``, the
   streams' length and the consumer group's backlog.

Targets: no errors (API non-2xx or failed requests, failed appends, refresher failures, dead
letters, events left unapplied); RSS of each process growing less than 5% from the end of the
warm-up (the first ``--warmup-share`` of the run, and at least until the streams have filled to
their cap) to the end; no upward p99 trend (the least-squares line through the windows' p99
rises less than 25% of their median over the run); Redis memory bounded by stream trimming (the
streams stay at their cap, and their memory grows less than 5% after the warm-up). Redis's
total memory is reported beside it, not judged: the users' feature states keep growing for a
while as users reach categories, event types and contexts they had not seen (bounded by what
the catalogue has), which the sampled state size shows. It prints a table, writes ``--json``
and a PNG of p99, CPU and memory over time (``--png``).

    python benchmarks/soak_bench.py --minutes 1 --json benchmarks/results/soak-short.json
    python benchmarks/soak_bench.py --json benchmarks/results/soak.json      # 10 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
# Run from a checkout where the project is not pip-installed: import it from the tree.
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))

# The sibling benchmark modules import from this folder, the script's own (first on sys.path).
from freshness_bench import (  # noqa: E402
    HOST,
    Workload,
    _api,
    _drained,
    _free_port,
    _publish,
    _redis,
    _refresher,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving import loadgen  # noqa: E402
from serving.loadgen import RequestSpec  # noqa: E402

from encoder_service.data.contract import Event  # noqa: E402
from encoder_service.events import append_events, stream_keys  # noqa: E402
from encoder_service.redis_connection import sigterm_unwinds, sync_client  # noqa: E402
from encoder_service.refresher.deadletter import count_dead_letters  # noqa: E402
from encoder_service.store import state_key  # noqa: E402

GET_JSON = RequestSpec("GET", "/v1/users/{id}/embedding")
MAX_CONNECTIONS = 64
PACED_CONNECTIONS = 64
SAMPLE_EVERY_S = 5.0
TICK_S = 0.02
DRAIN_TIMEOUT_S = 120.0
TARGET_RSS_GROWTH = 0.05
TARGET_REDIS_GROWTH = 0.05
TARGET_P99_RISE = 0.25
LATENCY_MONITOR_MS = 50
STATE_SAMPLE = 200


@dataclass
class Window:
    """One window of paced load."""

    start_s: float
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    # Where a slow window's time went: the client's dispatcher waking late (its own process
    # starved of CPU), a request waiting for a free connection, or the answer coming late.
    dispatch_lag_p99_ms: float = float("nan")
    send_lag_p99_ms: float = float("nan")
    p99_from_send_ms: float = float("nan")


@dataclass
class Sample:
    at_s: float
    api_rss_mb: float
    refresher_rss_mb: float
    redis_used_mb: float
    stream_mb: float
    """The streams' own memory (``MEMORY USAGE``), the part that trimming must hold flat."""
    state_bytes: float
    """Mean size of a fixed sample of users' feature states: they grow as users reach new
    categories, event types and contexts, up to the number the catalogue has."""
    stream_entries: int
    backlog: int
    # CPU since the previous sample, in cores: the whole machine, and the soak's own processes
    # (this script, the load client, the API, the refresher, Valkey). The rest is other load.
    cpu_machine_cores: float = float("nan")
    cpu_soak_cores: float = float("nan")


@dataclass
class Soak:
    windows: list[Window] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    appended: int = 0
    append_errors: int = 0


def _process(cmdline_word: str) -> psutil.Process:
    """The child process of this benchmark whose command line has ``cmdline_word``."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if cmdline_word in child.cmdline():
                return child
    raise RuntimeError(f"no child process runs {cmdline_word!r}")


def _refresher_failures(port: int) -> float:
    """Loop iterations, batches or users that raised, from the refresher's metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "encoder_refresh_failures"
        for s in family.samples
        if s.name.endswith("_total")
    )


def _backlog(client: Any, shards: int) -> tuple[int, int]:
    """Entries held in the streams, and entries not yet applied (group lag plus pending)."""
    length = backlog = 0
    for stream in stream_keys(shards):
        length += int(client.xlen(stream))
        for group in client.xinfo_groups(stream):
            backlog += int(group["pending"]) + int(group["lag"] or 0)
    return length, backlog


@contextlib.contextmanager
def _producer(client: Any, workload: Workload, rate: float, shards: int, maxlen: int, soak: Soak):
    """Append ``rate`` events/s for known users on a thread until the block ends."""
    stop = threading.Event()
    rng = np.random.default_rng(3)

    def events(n: int) -> list[Event]:
        users = workload.users
        return [workload.event(users[int(rng.integers(len(users)))]) for _ in range(n)]

    def run() -> None:
        owed, next_tick = 0.0, time.monotonic()
        while not stop.is_set():
            owed += rate * TICK_S
            n = int(owed)
            owed -= n
            if n:
                try:
                    append_events(client, events(n), shards=shards, maxlen=maxlen)
                    soak.appended += n
                except Exception as exc:  # noqa: BLE001 - counted as an error, the soak goes on
                    soak.append_errors += 1
                    print(f"append failed: {exc}", file=sys.stderr)
            next_tick += TICK_S
            stop.wait(max(0.0, next_tick - time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _memory_usage(client: Any, keys: list[str]) -> int:
    """Bytes Redis holds for ``keys``, all of each value counted (``SAMPLES 0``)."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
    return sum(int(n or 0) for n in pipe.execute())


@contextlib.contextmanager
def _sampler(
    client: Any, shards: int, users: list[str], soak: Soak, started: float
) -> Iterator[None]:
    """Record memory and backlog every ``SAMPLE_EVERY_S`` on a thread until the block ends."""
    api, refresher = _process("serve"), _process("refresh")
    sampled_states = [state_key(u) for u in users[:STATE_SAMPLE]]
    stop = threading.Event()
    last = {"at": time.monotonic(), "machine": _machine_busy_s(), "soak": _soak_cpu_s()}

    def sample() -> None:
        length, backlog = _backlog(client, shards)
        now, machine, own = time.monotonic(), _machine_busy_s(), _soak_cpu_s()
        elapsed = max(now - last["at"], 1e-9)
        cpu_machine = (machine - last["machine"]) / elapsed
        cpu_soak = (own - last["soak"]) / elapsed
        last.update(at=now, machine=machine, soak=own)
        soak.samples.append(
            Sample(
                at_s=time.monotonic() - started,
                api_rss_mb=api.memory_info().rss / 2**20,
                refresher_rss_mb=refresher.memory_info().rss / 2**20,
                redis_used_mb=int(client.info("memory")["used_memory"]) / 2**20,
                stream_mb=_memory_usage(client, stream_keys(shards)) / 2**20,
                state_bytes=_memory_usage(client, sampled_states) / len(sampled_states),
                stream_entries=length,
                backlog=backlog,
                cpu_machine_cores=cpu_machine,
                cpu_soak_cores=cpu_soak,
            )
        )

    def run() -> None:
        while not stop.wait(SAMPLE_EVERY_S):
            sample()

    sample()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        sample()


def _paced_window(port: int, ids_file: Path, rate: float, seconds: float) -> loadgen.LoadResult:
    return loadgen.run_client(
        loadgen.client_argv(
            "paced",
            port,
            GET_JSON,
            ids_file,
            connections=PACED_CONNECTIONS,
            duration_s=seconds,
            warmup_s=0.0,
            rate=rate,
        )
    )


def _failed_window(start: float, seconds: float, rate: float) -> Window:
    """A window whose load client failed: latency at the client's timeout, all requests errors."""
    timeout_ms = loadgen.REQUEST_TIMEOUT_S * 1000
    due = round(rate * seconds)
    return Window(start, seconds, 0.0, timeout_ms, timeout_ms, timeout_ms, due, due)


def _soak_cpu_s() -> float:
    """CPU seconds used so far by this process, its descendants alive now, and the children it
    has already waited for (each window's load client)."""
    me = psutil.Process()
    own = me.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def _other_cores(sample: Sample) -> float:
    """CPU taken by processes outside the soak in a sample's interval, in cores."""
    return max(0.0, sample.cpu_machine_cores - sample.cpu_soak_cores)


def _valkey_latency_events(client: Any) -> list[dict]:
    """Valkey's own record of its slow events (fork, expiry, commands) over the threshold."""
    return [
        {"event": str(e[0]), "latest_unix": int(e[1]), "latest_ms": int(e[2]), "max_ms": int(e[3])}
        for e in client.execute_command("LATENCY", "LATEST")
    ]


def _machine_busy_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _growth(times: np.ndarray, values: np.ndarray, after_s: float) -> float:
    """Relative growth from the end of the warm-up to the end of the run: the median of the
    last quarter of the post-warm-up samples over the median of the first quarter (medians, so
    one sample taken mid-collection does not decide)."""
    kept = values[times >= after_s]
    if len(kept) < 2:
        return float("nan")
    quarter = max(1, len(kept) // 4)
    first, last = float(np.median(kept[:quarter])), float(np.median(kept[-quarter:]))
    return (last - first) / first


def _p99_rise(windows: list[Window], after_s: float) -> tuple[float, float]:
    """The least-squares slope of the windows' p99 (ms per minute) after the warm-up, and the
    rise it implies over that span as a share of the median p99."""
    kept = [w for w in windows if w.start_s >= after_s] or windows
    if len(kept) < 3:
        return float("nan"), float("nan")
    t = np.array([w.start_s for w in kept]) / 60
    p99 = np.array([w.p99_ms for w in kept])
    slope = float(np.polyfit(t, p99, 1)[0])
    return slope, slope * (t[-1] - t[0]) / float(np.median(p99))


def _warmup_s(args: Any) -> float:
    """The start not judged: ``--warmup-share`` of the run, and at least until the streams
    have filled to their cap (before that, Redis memory grows by design)."""
    fill_s = args.stream_maxlen * args.shards / args.events_per_second
    return max(args.minutes * 60 * args.warmup_share, fill_s)


def _below(value: float, target: float) -> bool | None:
    """Whether ``value`` holds its target; None (not judged) when the run was too short to
    give it, e.g. fewer than three p99 windows after the warm-up."""
    return None if np.isnan(value) else bool(value < target)


def _figures(args: Any, max_rps: float, rate: float, soak: Soak, errors: dict) -> list[dict]:
    after = _warmup_s(args)
    times = np.array([s.at_s for s in soak.samples])
    rows: list[dict] = []

    def add(name: str, value: float, unit: str, target: str | None, held: bool | None) -> None:
        rows.append({"name": name, "value": value, "unit": unit, "target": target, "held": held})

    add("API max load (closed loop, single GET)", max_rps, "req/s", None, None)
    add("API paced load", rate, "req/s", f"{args.load_fraction:.0%} of max", None)
    add("events appended", soak.appended / (args.minutes * 60), "events/s", None, None)
    add("warm-up, not judged", after, "s", None, None)
    total_requests = sum(w.requests for w in soak.windows)
    add("API requests during the soak", total_requests, "requests", None, None)
    for name, value in errors.items():
        add(f"errors: {name}", value, "count", "0", value == 0)
    p99s = np.array([w.p99_ms for w in soak.windows])
    add("API p99, median of windows", float(np.median(p99s)), "ms", None, None)
    add("API p99, worst window", float(p99s.max()), "ms", None, None)
    slope, rise = _p99_rise(soak.windows, after)
    add("API p99 trend after warm-up", slope, "ms/min", None, None)
    add(
        "API p99 fitted rise over the run",
        rise,
        "share of median",
        f"< {TARGET_P99_RISE:.0%}",
        _below(rise, TARGET_P99_RISE),
    )
    for label, attr in (("API", "api_rss_mb"), ("refresher", "refresher_rss_mb")):
        values = np.array([getattr(s, attr) for s in soak.samples])
        add(f"{label} RSS at the end", float(values[-1]), "MiB", None, None)
        growth = _growth(times, values, after)
        add(
            f"{label} RSS growth after warm-up",
            growth,
            "share",
            f"< {TARGET_RSS_GROWTH:.0%}",
            _below(growth, TARGET_RSS_GROWTH),
        )
    redis_mb = np.array([s.redis_used_mb for s in soak.samples])
    add("Redis used memory at the end", float(redis_mb[-1]), "MiB", None, None)
    add(
        "Redis used memory growth after warm-up",
        _growth(times, redis_mb, after),
        "share",
        None,
        None,
    )
    stream_mb = np.array([s.stream_mb for s in soak.samples])
    growth = _growth(times, stream_mb, after)
    add("stream memory at the end", float(stream_mb[-1]), "MiB", None, None)
    add(
        "stream memory growth after warm-up",
        growth,
        "share",
        f"< {TARGET_REDIS_GROWTH:.0%}",
        _below(growth, TARGET_REDIS_GROWTH),
    )
    states = np.array([s.state_bytes for s in soak.samples])
    add("feature state size (sampled users), start", float(states[0]), "bytes", None, None)
    add("feature state size (sampled users), end", float(states[-1]), "bytes", None, None)
    longest = max(s.stream_entries for s in soak.samples)
    # MAXLEN ~ trims whole macro-nodes: a stream may run up to one node (100 entries) over.
    cap = args.stream_maxlen * args.shards + 100 * args.shards
    add("stream entries, most seen", longest, "entries", f"<= {cap} (the cap)", longest <= cap)
    add("backlog, most seen", max(s.backlog for s in soak.samples), "entries", None, None)
    other = [_other_cores(s) for s in soak.samples[1:]]
    if other:
        add("CPU of other processes, most seen", max(other), "cores", None, None)
    lag = np.array([w.dispatch_lag_p99_ms for w in soak.windows])
    if np.isfinite(lag).any():
        add("load client's own lag p99, worst window", float(np.nanmax(lag)), "ms", None, None)
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'figure':<42} {'value':>12}  {'unit':<16} {'target':<18} held"]
    for r in rows:
        value = r["value"]
        text = f"{value:.3f}" if isinstance(value, float) and abs(value) < 10 else f"{value:,.0f}"
        held = "" if r["held"] is None else ("yes" if r["held"] else "NO")
        lines.append(f"{r['name']:<42} {text:>12}  {r['unit']:<16} {r['target'] or '':<18} {held}")
    return "\n".join(lines)


def _plot(path: Path, soak: Soak, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(9, 8.5), sharex=True, height_ratios=(3, 2, 3)
    )
    t = [(w.start_s + w.seconds / 2) / 60 for w in soak.windows]
    top.plot(t, [w.p99_ms for w in soak.windows], marker="o", label="p99")
    top.plot(t, [w.p50_ms for w in soak.windows], marker=".", label="p50")
    top.set_ylabel("API latency (ms)")
    top.set_title(title)
    top.legend()
    top.grid(alpha=0.3)
    ts = [s.at_s / 60 for s in soak.samples]
    middle.plot(ts, [s.cpu_soak_cores for s in soak.samples], label="soak processes")
    middle.plot(ts, [_other_cores(s) for s in soak.samples], label="other processes")
    middle.set_ylabel("CPU (cores)")
    middle.set_ylim(bottom=0)
    middle.legend()
    middle.grid(alpha=0.3)
    bottom.plot(ts, [s.api_rss_mb for s in soak.samples], label="API RSS")
    bottom.plot(ts, [s.refresher_rss_mb for s in soak.samples], label="refresher RSS")
    bottom.plot(ts, [s.redis_used_mb for s in soak.samples], label="Redis used memory")
    bottom.plot(ts, [s.stream_mb for s in soak.samples], label="of it, the streams")
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("minutes")
    bottom.set_ylim(bottom=0)
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="Length of the soak.")
    parser.add_argument("--users", type=int, default=5000, help="Published users.")
    parser.add_argument("--events-per-second", type=float, default=500.0)
    parser.add_argument("--load-fraction", type=float, default=0.5, help="Of the max load.")
    parser.add_argument("--max-rps", type=float, help="Skip measuring the max; use this.")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="Max-load run length.")
    parser.add_argument("--window-seconds", type=float, default=15.0, help="One p99 per window.")
    parser.add_argument("--warmup-share", type=float, default=0.2, help="Of the run, not judged.")
    parser.add_argument("--stream-maxlen", type=int, default=10_000, help="Per stream.")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs of the version.")
    parser.add_argument("--redis-url", help="An empty Redis to use instead of a throwaway one.")
    parser.add_argument("--json", type=Path, help="Write every figure here.")
    parser.add_argument("--png", type=Path, help="Plot p99 and RSS over time here.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak = Soak()
    with _redis(args.redis_url) as url, tempfile.TemporaryDirectory() as tmp:
        client = sync_client(url)
        if client.dbsize():
            raise SystemExit("--redis-url must name an empty database")
        # Valkey records any event slower than this (a fork, an expiry cycle, a slow command).
        client.config_set("latency-monitor-threshold", LATENCY_MONITOR_MS)
        users, items = _publish(client, args.users, args.epochs, Path(tmp))
        ids_file = Path(tmp) / "ids.txt"
        ids_file.write_text("\n".join(users))
        workload = Workload(users, items, seed=2)
        metrics_port, api_port = _free_port(), _free_port()
        with (
            _maxlen_env(args.stream_maxlen),
            _api(url, api_port, Path(tmp) / "api.log"),
            _refresher(url, [metrics_port], args.shards, 512, 20, Path(tmp) / "refresher.log"),
        ):
            max_rps = (
                args.max_rps
                or loadgen.run_client(
                    loadgen.client_argv(
                        "closed",
                        api_port,
                        GET_JSON,
                        ids_file,
                        connections=MAX_CONNECTIONS,
                        duration_s=args.max_seconds,
                        warmup_s=2.0,
                    )
                ).rps
            )
            rate = max_rps * args.load_fraction
            print(f"max {max_rps:,.0f} req/s; soaking at {rate:,.0f} req/s for {args.minutes} min")
            failures_before = _refresher_failures(metrics_port)
            started = time.monotonic()
            end = started + args.minutes * 60
            producer = _producer(
                client,
                workload,
                args.events_per_second,
                args.shards,
                args.stream_maxlen,
                soak,
            )
            with producer, _sampler(client, args.shards, users, soak, started):
                while (left := end - time.monotonic()) > 1.0:
                    seconds = min(args.window_seconds, left)
                    window_start = time.monotonic() - started
                    try:
                        result = _paced_window(api_port, ids_file, rate, seconds)
                    except RuntimeError as exc:
                        # The load client gave up (requests outstanding past its timeout): the
                        # window counts as failed, every request it was due to send an error,
                        # and the soak goes on so the report still shows what came after.
                        print(f"{window_start / 60:5.1f} min: window failed ({exc})", flush=True)
                        soak.windows.append(_failed_window(window_start, seconds, rate))
                        continue
                    soak.windows.append(
                        Window(
                            window_start,
                            seconds,
                            result.rps,
                            result.p50_ms,
                            result.p99_ms,
                            result.max_ms,
                            result.requests,
                            result.errors,
                            result.extra.get("dispatch_lag_p99_ms", float("nan")),
                            result.extra.get("send_lag_p99_ms", float("nan")),
                            result.extra.get("service_p99_ms", float("nan")),
                        )
                    )
                    print(
                        f"{window_start / 60:5.1f} min: p99 {result.p99_ms:6.1f} ms, "
                        f"(client lag {result.extra.get('dispatch_lag_p99_ms', float('nan')):.1f}, "
                        f"send lag {result.extra.get('send_lag_p99_ms', float('nan')):.1f}, "
                        f"from send {result.extra.get('service_p99_ms', float('nan')):.1f}), "
                        f"{result.rps:,.0f} req/s, {result.errors} errors, "
                        f"CPU other {_other_cores(soak.samples[-1]):.2f} cores, "
                        f"RSS API {soak.samples[-1].api_rss_mb:.0f} MiB, "
                        f"Redis {soak.samples[-1].redis_used_mb:.1f} MiB",
                        flush=True,
                    )
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while not _drained(client, args.shards) and time.monotonic() < deadline:
                time.sleep(0.1)
            errors = {
                "API (non-2xx or failed)": sum(w.errors for w in soak.windows),
                "appends": soak.append_errors,
                "refresher failures": _refresher_failures(metrics_port) - failures_before,
                "dead letters": count_dead_letters(client),
                "events left unapplied": _backlog(client, args.shards)[1],
            }
            valkey_events = _valkey_latency_events(client)
    rows = _figures(args, max_rps, rate, soak, errors)
    print(_table(rows))
    print(f"Valkey events over {LATENCY_MONITOR_MS} ms: {valkey_events or 'none'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "soak",
            "command": " ".join(sys.argv),
            "settings": vars(args) | {"json": str(args.json), "png": str(args.png)},
            "figures": rows,
            "windows": [asdict(w) for w in soak.windows],
            "samples": [asdict(s) for s in soak.samples],
            "valkey_latency_events": valkey_events,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        _plot(args.png, soak, f"soak: {rate:,.0f} req/s + {args.events_per_second:,.0f} events/s")
    return 0 if all(r["held"] is not False for r in rows) else 1


@contextlib.contextmanager
def _maxlen_env(maxlen: int) -> Iterator[None]:
    """The API and refresher read their settings from the environment: cap the streams there."""
    before = os.environ.get("ENCODER_STREAM_MAXLEN")
    os.environ["ENCODER_STREAM_MAXLEN"] = str(maxlen)
    try:
        yield
    finally:
        if before is None:
            del os.environ["ENCODER_STREAM_MAXLEN"]
        else:
            os.environ["ENCODER_STREAM_MAXLEN"] = before


if __name__ == "__main__":
    with sigterm_unwinds():
        raise SystemExit(main())
