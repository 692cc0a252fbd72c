"""Load generation for the serving benchmark; every driver runs in a process of its own.

Two ways to load a server:

* **Closed loop** (throughput): ``C`` connections, each sending its next request as soon as the
  previous answer arrived, for a fixed time. ``wrk`` does this when it is installed: it is C and
  needs a fraction of the CPU a Python client would take from the servers on a 2-core machine.
  Without ``wrk`` the asyncio client below does the same.
* **Open loop** (latency at a given rate): requests are due on a fixed schedule, whatever the
  server does, and each latency is counted from the time the request was *due*, not from when
  it was sent. A closed loop hides a stall (the clients just wait, and the slow answer counts
  once); an open loop charges it to every request that should have gone out meanwhile, which is
  what callers of a service see. wrk2 does this in C but is not packaged here, so the asyncio
  client implements it.

Run as a script (``python loadgen.py closed|paced ...``) it prints one JSON object: the
benchmark starts it as a child process so that the client never shares an interpreter, a GIL or
an event loop with a server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

POOL_SIZE = 256  # pre-built bodies for multi-id requests: building 1,000 ids per request is slow
RESULT_MARKER = "LOADGEN-RESULT "
REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RequestSpec:
    """What one request of a case looks like; ids are filled in at random per request.

    ``path`` may hold ``{id}`` (one random user id) and ``body`` may hold ``{ids}`` (a JSON array
    of ``ids_per_request`` random user ids).
    """

    method: str
    path: str
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    ids_per_request: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RequestSpec:
        raw = json.loads(text)
        raw["headers"] = tuple(tuple(h) for h in raw["headers"])
        return cls(**raw)


@dataclass
class LoadResult:
    """One measured run. Latencies in milliseconds; ``errors`` counts failed and non-2xx calls."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: int
    tool: str
    extra: dict[str, float] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (``q`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------

_LUA_TEMPLATE = """
local ids = {}
for line in io.lines([==[@IDS_FILE@]==]) do ids[#ids + 1] = line end
local n = #ids
local method = [==[@METHOD@]==]
local headers = {@HEADERS@}
local path_a, path_b = [==[@PATH_A@]==], @PATH_B@
local body_a, body_b = [==[@BODY_A@]==], @BODY_B@
local k = @K@
local pool = nil
local next_thread = 0

local function quoted_ids(count)
  local chosen = {}
  for i = 1, count do chosen[i] = ids[math.random(n)] end
  return '["' .. table.concat(chosen, '","') .. '"]'
end

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_id", next_thread)
end

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  if body_b and k > 1 then
    pool = {}
    for i = 1, @POOL@ do pool[i] = body_a .. quoted_ids(k) .. body_b end
  end
end

function request()
  local path = path_a
  if path_b then path = path_a .. ids[math.random(n)] .. path_b end
  local body = nil
  if pool then
    body = pool[math.random(#pool)]
  elseif body_b then
    body = body_a .. quoted_ids(1) .. body_b
  end
  return wrk.format(method, path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '@MARKER@{"requests":%.0f,"duration_us":%.0f,"p50":%.0f,"p99":%.0f,"p999":%.0f,'
    .. '"max":%.0f,"errors":%.0f}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def _lua_long(text: str) -> str:
    if "]==]" in text:
        raise ValueError(f"cannot embed {text!r} in a Lua long string")
    return f"[==[{text}]==]"


def _lua_split(text: str, placeholder: str) -> tuple[str, str]:
    """The Lua literals of the text before and after ``placeholder`` (``nil`` if absent)."""
    if placeholder not in text:
        return text, "nil"
    before, after = text.split(placeholder, 1)
    return before, _lua_long(after)


def wrk_script(spec: RequestSpec, ids_file: Path) -> str:
    """A wrk Lua script sending ``spec`` with random ids read from ``ids_file``."""
    path_a, path_b = _lua_split(spec.path, "{id}")
    body_a, body_b = _lua_split(spec.body, "{ids}") if spec.body else ("", "nil")
    headers = list(spec.headers)
    if spec.body:
        headers.append(("Content-Type", "application/json"))
    # "[ [==[" with spaces: "[[" would open a Lua long string.
    header_lua = ", ".join(f"[ {_lua_long(k)} ] = {_lua_long(v)}" for k, v in headers)
    replacements = {
        "@IDS_FILE@": str(ids_file),
        "@METHOD@": spec.method,
        "@HEADERS@": header_lua,
        "@PATH_A@": path_a,
        "@PATH_B@": path_b,
        "@BODY_A@": body_a,
        "@BODY_B@": body_b,
        "@K@": str(spec.ids_per_request),
        "@POOL@": str(POOL_SIZE),
        "@MARKER@": RESULT_MARKER,
    }
    script = _LUA_TEMPLATE
    for key, value in replacements.items():
        script = script.replace(key, value)
    return script


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    base_url: str,
    spec: RequestSpec,
    ids_file: Path,
    *,
    connections: int,
    duration_s: float,
    threads: int = 1,
) -> LoadResult:
    """One closed-loop wrk run; wrk's own latency histogram gives the percentiles.

    One wrk thread drives 32 connections at well over 20k requests/s on loopback, so the default
    leaves the second core to the servers.
    """
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        script = Path(tmp) / "case.lua"
        script.write_text(wrk_script(spec, ids_file))
        cmd = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={REQUEST_TIMEOUT_S:.0f}s",
            "-s",
            str(script),
            base_url,
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, timeout=duration_s + 60
        ).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith(RESULT_MARKER)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    raw = json.loads(line[len(RESULT_MARKER) :])
    seconds = raw["duration_us"] / 1e6
    return LoadResult(
        requests=int(raw["requests"]),
        seconds=seconds,
        rps=raw["requests"] / seconds,
        p50_ms=raw["p50"] / 1e3,
        p99_ms=raw["p99"] / 1e3,
        p999_ms=raw["p999"] / 1e3,
        max_ms=raw["max"] / 1e3,
        errors=int(raw["errors"]),
        tool="wrk",
    )


# --------------------------------------------------------------------------------------------
# The asyncio client
# --------------------------------------------------------------------------------------------


class RequestFactory:
    """Raw HTTP/1.1 requests for a spec, with random ids, ready to write on a socket."""

    def __init__(self, spec: RequestSpec, ids: Sequence[str], host: str, seed: int) -> None:
        self.spec = spec
        self.ids = ids
        self.rng = random.Random(seed)
        self.host = host
        extra = "".join(f"{k}: {v}\r\n" for k, v in spec.headers)
        self.head = f"Host: {host}\r\n{extra}"
        self.pool: list[bytes] | None = None
        if spec.ids_per_request > 1:
            self.pool = [self._build() for _ in range(POOL_SIZE)]

    def _build(self) -> bytes:
        spec = self.spec
        path = spec.path.replace("{id}", self.rng.choice(self.ids))
        if not spec.body:
            return f"{spec.method} {path} HTTP/1.1\r\n{self.head}\r\n".encode()
        chosen = [self.rng.choice(self.ids) for _ in range(spec.ids_per_request)]
        body = spec.body.replace("{ids}", json.dumps(chosen)).encode()
        head = (
            f"{spec.method} {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def next(self) -> bytes:
        if self.pool is not None:
            return self.rng.choice(self.pool)
        return self._build()


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight, driven by callbacks.

    No future or task per request: the answer is handed to ``on_response`` straight from
    ``data_received``, which keeps the client's CPU per request low on a machine whose cores it
    shares with the server under test. Parses just enough of each response (status line and
    Content-Length) to know where it ends; every server under test sends fixed-length bodies.
    """

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due = 0.0
        self.sent = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.lost(self, exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes, due: float, now: float) -> None:
        assert self.transport is not None
        self.due, self.sent, self.busy = due, now, True
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        marker = head.find(b"content-length:")
        if marker < 0:
            self.run.fail(ValueError("response without Content-Length"))
            return
        line_end = head.find(b"\r\n", marker)
        length = int(head[marker + 15 : line_end if line_end > 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        del self.buffer[:total]
        self.busy = False
        self.run.on_response(self, int(head[9:12]))


class _Run:
    """The bookkeeping of one run: idle connections, requests waiting for one, what was seen.

    A request is due at ``due``; it goes out on an idle connection at once, or waits in the
    backlog until one frees up. Latency runs from ``due``, so time spent waiting for a
    connection counts; only requests due inside the measured window are recorded.
    """

    def __init__(self, factory: RequestFactory, measure_from: float, measure_until: float) -> None:
        self.factory = factory
        self.measure_from = measure_from
        self.measure_until = measure_until
        # First in, first out: every connection stays in use, so none sits idle long enough
        # for the server's keep-alive timeout to close it.
        self.idle: collections.deque[_Connection] = collections.deque()
        self.backlog: collections.deque[float] = collections.deque()
        self.in_flight = 0
        self.latencies: list[float] = []
        self.from_send: list[float] = []
        self.lags: list[float] = []
        self.dispatch_lags: list[float] = []
        self.errors = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed_loop = False
        self.finished_sending = False

    def submit(self, due: float, now: float) -> None:
        if self.measure_from <= due < self.measure_until:
            self.dispatch_lags.append(now - due)
        if self.idle:
            self.in_flight += 1
            self.idle.popleft().send(self.factory.next(), due, now)
        else:
            self.backlog.append(due)

    def on_response(self, conn: _Connection, status: int) -> None:
        now = time.perf_counter()
        if self.measure_from <= conn.due < self.measure_until:
            self.latencies.append(now - conn.due)
            self.from_send.append(now - conn.sent)
            self.lags.append(conn.sent - conn.due)
            self.errors += not 200 <= status < 300
        if self.closed_loop and now < self.measure_until:
            conn.send(self.factory.next(), now, now)
        elif self.backlog:
            conn.send(self.factory.next(), self.backlog.popleft(), now)
        else:
            self.in_flight -= 1
            self.idle.append(conn)
            if self.finished_sending and not self.in_flight and not self.done.done():
                self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def lost(self, conn: _Connection, exc: Exception | None) -> None:
        """An idle connection closed by the server is dropped; one with a request fails the run."""
        if conn.busy:
            self.fail(exc or ConnectionError("connection closed with a request in flight"))
        elif conn in self.idle:
            self.idle.remove(conn)

    async def connect(self, host: str, port: int, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            _, conn = await loop.create_connection(lambda: _Connection(self), host, port)
            self.idle.append(conn)

    async def drain(self, timeout: float) -> None:
        """Wait for every request sent to be answered, then close the connections."""
        self.finished_sending = True
        if not self.in_flight and not self.done.done():
            self.done.set_result(None)
        async with asyncio.timeout(timeout):
            await self.done
        for conn in list(self.idle):
            conn.close()

    def result(self, seconds: float, tool: str) -> LoadResult:
        latencies = sorted(self.latencies)
        return LoadResult(
            requests=len(latencies),
            seconds=seconds,
            rps=len(latencies) / seconds,
            p50_ms=percentile(latencies, 50) * 1e3,
            p99_ms=percentile(latencies, 99) * 1e3,
            p999_ms=percentile(latencies, 99.9) * 1e3,
            max_ms=(latencies[-1] if latencies else math.nan) * 1e3,
            errors=self.errors,
            tool=tool,
        )


async def closed_loop(
    host: str,
    port: int,
    factory: RequestFactory,
    *,
    connections: int,
    duration_s: float,
    warmup_s: float,
) -> LoadResult:
    """The wrk fallback: every connection sends back to back; only post-warm-up calls count."""
    start = time.perf_counter()
    run = _Run(factory, start + warmup_s, start + warmup_s + duration_s)
    run.closed_loop = True
    await run.connect(host, port, connections)
    now = time.perf_counter()
    for _ in range(connections):
        run.submit(now, now)
    await asyncio.sleep(run.measure_until - time.perf_counter())
    await run.drain(REQUEST_TIMEOUT_S)
    return run.result(duration_s, "asyncio-closed")


async def paced(
    host: str,
    port: int,
    factory: RequestFactory,
    *,
    rate: float,
    connections: int,
    duration_s: float,
    warmup_s: float,
) -> LoadResult:
    """Open loop at ``rate`` requests/s; latency runs from each request's scheduled send time.

    Request ``i`` is due at ``start + i / rate``. One dispatcher wakes up, sends every request
    now due (or queues it when all connections are busy; that wait is part of its latency) and
    sleeps until the next is due. The stock event loop's timers have millisecond resolution and
    never fire early, so a request goes out up to about 1 ms late: that lag is charged to the
    server (conservative) and reported as ``send_lag_p99_ms``, next to ``service_p99_ms``
    counted from the actual send. The send lag also holds the wait for a free connection (the
    server's doing); ``dispatch_lag_p99_ms`` is the client's part alone, how late the dispatcher
    itself woke up, which grows when the client process is starved of CPU.
    """
    start = time.perf_counter() + 0.05
    run = _Run(factory, start + warmup_s, start + warmup_s + duration_s)
    await run.connect(host, port, connections)
    total = int((warmup_s + duration_s) * rate)
    sent = 0
    while sent < total:
        now = time.perf_counter()
        while sent < total and (due := start + sent / rate) <= now:
            run.submit(due, now)
            sent += 1
        if sent < total:
            await asyncio.sleep(start + sent / rate - time.perf_counter())
    await run.drain(REQUEST_TIMEOUT_S)
    result = run.result(duration_s, "asyncio-paced")
    result.extra = {
        "rate": rate,
        "service_p99_ms": percentile(sorted(run.from_send), 99) * 1e3,
        "send_lag_p99_ms": percentile(sorted(run.lags), 99) * 1e3,
        "dispatch_lag_p99_ms": percentile(sorted(run.dispatch_lags), 99) * 1e3,
    }
    return result


def run_client(argv: Sequence[str]) -> LoadResult:
    """Run the asyncio client as a child process and return what it measured."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"the load client failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return LoadResult(**json.loads(line[len(RESULT_MARKER) :]))


def client_argv(
    mode: str,
    port: int,
    spec: RequestSpec,
    ids_file: Path,
    *,
    connections: int,
    duration_s: float,
    warmup_s: float,
    rate: float = 0.0,
) -> list[str]:
    """The command line of :func:`main` for one run."""
    return [
        mode,
        "--port",
        str(port),
        "--spec",
        spec.to_json(),
        "--ids-file",
        str(ids_file),
        "--connections",
        str(connections),
        "--duration",
        str(duration_s),
        "--warmup",
        str(warmup_s),
        "--rate",
        str(rate),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["closed", "paced"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", required=True, help="A RequestSpec as JSON.")
    parser.add_argument("--ids-file", type=Path, required=True, help="One user id a line.")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="Measured seconds.")
    parser.add_argument("--warmup", type=float, default=2.0, help="Unmeasured seconds first.")
    parser.add_argument("--rate", type=float, default=0.0, help="Requests/s (paced mode).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ids = args.ids_file.read_text().split()
    factory = RequestFactory(
        RequestSpec.from_json(args.spec), ids, f"{args.host}:{args.port}", args.seed
    )
    common = {"connections": args.connections, "duration_s": args.duration}
    if args.mode == "closed":
        coro = closed_loop(args.host, args.port, factory, warmup_s=args.warmup, **common)
    else:
        if args.rate <= 0:
            parser.error("paced mode needs --rate")
        coro = paced(args.host, args.port, factory, rate=args.rate, warmup_s=args.warmup, **common)
    # The stock event loop on purpose: its timers never fire early, which the pacing relies on.
    result = asyncio.run(coro)
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
