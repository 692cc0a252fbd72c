"""Publish throughput and Redis memory per user of the embedding layout.

Writes N random embeddings through ``EmbeddingStore.write_embeddings`` (key building, encoding
and the network included) for float32 and float16, and reports users/s and the server's
``used_memory`` growth per user against the raw ``dim * 4`` bytes of a float32 vector. When
float32 misses the memory target (or with ``--alternatives``) it also measures what the
overhead is made of: an 8-byte timestamp header (the first design, which the layout dropped
to stay in the 320-byte allocation class), the key length, and hash bucketing.

    python benchmarks/store_bench.py --users 100000 --dim 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import redis

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from encoder_service.redis_connection import sigterm_unwinds, start_server, sync_client  # noqa: E402
from encoder_service.store import (  # noqa: E402
    EmbeddingDtype,
    EmbeddingStore,
    embedding_key,
)

TIMESTAMP_HEADER = struct.Struct("<d")
"""The 8-byte refresh-time prefix of the first value layout, measured as an alternative."""

THROUGHPUT_TARGET = 100_000.0  # users/s
MEMORY_RATIO_TARGET = 1.3  # x raw float32 bytes
BUCKET_SIZE = 100  # users per hash in the bucketing alternative
# Two-character version ids, like "v1", so the keys measured are as long as real ones; distinct
# from any real version so that --redis-url never touches real data.
VERSIONS: dict[EmbeddingDtype, str] = {"float32": "b4", "float16": "b2"}


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str | None = None
    held: bool | None = None


def _at_least(name: str, value: float, unit: str, target: float) -> Figure:
    return Figure(name, value, unit, f">= {target:g}", value >= target)


def _at_most(name: str, value: float, unit: str, target: float) -> Figure:
    return Figure(name, value, unit, f"<= {target:g}", value <= target)


def _settle(client: redis.Redis) -> None:
    """Wait until deleted keys are really freed, so ``used_memory`` deltas start clean."""
    while client.info("memory").get("lazyfree_pending_objects", 0):
        time.sleep(0.05)
    time.sleep(0.2)


def _drop(client: redis.Redis, pattern: str) -> None:
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) == 1000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)
    _settle(client)


def _memory_per_user(client: redis.Redis, n: int, write: Callable[[], object]) -> float:
    _settle(client)
    before = client.info("memory")["used_memory"]
    write()
    _settle(client)
    return (client.info("memory")["used_memory"] - before) / n


def _mean_memory_usage(client: redis.Redis, keys: list[str]) -> float:
    return float(np.mean([client.memory_usage(key, samples=0) for key in keys]))


def _publish(client: redis.Redis, args: argparse.Namespace, raw_bytes: int) -> list[Figure]:
    store = EmbeddingStore(client)
    users = [f"user{i:07d}" for i in range(args.users)]
    matrix = np.random.default_rng(args.seed).standard_normal((args.users, args.dim))
    matrix = matrix.astype(np.float32)
    figures: list[Figure] = []
    for dtype, version in VERSIONS.items():
        store.delete_version(version)
        elapsed = 0.0

        def write(version: str = version, dtype: EmbeddingDtype = dtype) -> None:
            nonlocal elapsed
            start = time.perf_counter()
            store.write_embeddings(version, users, matrix, dtype=dtype, batch_size=args.batch_size)
            elapsed = time.perf_counter() - start

        per_user = _memory_per_user(client, args.users, write)
        if store.count_embeddings(version) != args.users:
            raise RuntimeError(f"{version}: not every user was written")
        sample = [embedding_key(version, u) for u in users[:: max(1, args.users // 200)]]
        figures += [
            _at_least(f"publish {dtype}", args.users / elapsed, "users/s", THROUGHPUT_TARGET),
            Figure(f"memory per user {dtype}", per_user, "bytes"),
            _at_most(f"memory ratio {dtype}", per_user / raw_bytes, "x raw", MEMORY_RATIO_TARGET),
            Figure(f"MEMORY USAGE per key {dtype}", _mean_memory_usage(client, sample), "bytes"),
            Figure(f"GET latency {dtype}", _latency_us(partial(client.get, sample[-1])), "us"),
        ]
        store.delete_version(version)
    return figures


def _alternatives(client: redis.Redis, args: argparse.Namespace, raw_bytes: int) -> list[Figure]:
    """float32 variants written with plain MSET/HSET, each measured like the real layout."""
    n = args.users
    vectors = np.random.default_rng(args.seed).standard_normal((n, args.dim)).astype("<f4")
    bare = [row.tobytes() for row in vectors]
    header = TIMESTAMP_HEADER.pack(time.time())
    with_header = [header + value for value in bare]
    short_ids = [f"user{i:07d}" for i in range(n)]
    uuid_ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]

    def plain(keys: list[str], values: list[bytes]) -> Callable[[], None]:
        def write() -> None:
            for start in range(0, n, args.batch_size):
                end = start + args.batch_size
                client.mset(dict(zip(keys[start:end], values[start:end], strict=True)))

        return write

    def bucketed(values: list[bytes]) -> Callable[[], None]:
        buckets = max(1, n // BUCKET_SIZE)

        def write() -> None:
            with client.pipeline(transaction=False) as pipe:
                for user, value in zip(short_ids, values, strict=True):
                    pipe.hset(f"emb:k4:{{{zlib.crc32(user.encode()) % buckets}}}", user, value)
                pipe.execute()

        return write

    variants: list[tuple[str, Callable[[], None], str]] = [
        (
            "no header, 20-char key (the layout)",
            plain([f"emb:n4:{{{u}}}" for u in short_ids], bare),
            "emb:n4:*",
        ),
        (
            "8-byte header, 20-char key (the first design)",
            plain([f"emb:h4:{{{u}}}" for u in short_ids], with_header),
            "emb:h4:*",
        ),
        (
            "no header, 45-char key (UUID user ids)",
            plain([f"emb:u4:{{{u}}}" for u in uuid_ids], bare),
            "emb:u4:*",
        ),
        (f"hash buckets of ~{BUCKET_SIZE}, default encoding", bucketed(bare), "emb:k4:*"),
    ]
    figures: list[Figure] = []
    for label, write, pattern in variants:
        per_user = _memory_per_user(client, n, write)
        figures.append(Figure(f"alt {label}", per_user, "bytes"))
        figures.append(Figure(f"alt {label} ratio", per_user / raw_bytes, "x raw"))
        sample = [k.decode() for k in islice(client.scan_iter(match=pattern), 100)]
        figures.append(
            Figure(f"alt {label} MEMORY USAGE", _mean_memory_usage(client, sample), "bytes")
        )
        _drop(client, pattern)
    figures += _listpack_buckets(client, n, bucketed(bare), raw_bytes)
    return figures


def _listpack_buckets(
    client: redis.Redis, n: int, write: Callable[[], None], raw_bytes: int
) -> list[Figure]:
    """Hash buckets kept as listpacks, which needs a server setting raised above the value size."""
    label = f"hash buckets of ~{BUCKET_SIZE}, listpack (hash-max-listpack-value 512)"
    try:
        previous = str(client.config_get("hash-max-listpack-value")["hash-max-listpack-value"])
        client.config_set("hash-max-listpack-value", 512)
    except redis.ResponseError as exc:
        print(f"skipped {label}: {exc}")
        return []
    try:
        per_user = _memory_per_user(client, n, write)
        key = next(client.scan_iter(match="emb:k4:*"))
        field = client.hkeys(key)[-1]  # the last field: a listpack lookup scans past the others
        lookup = _latency_us(partial(client.hget, key, field))
    finally:
        _drop(client, "emb:k4:*")
        client.config_set("hash-max-listpack-value", previous)
    return [
        Figure(f"alt {label}", per_user, "bytes"),
        Figure(f"alt {label} ratio", per_user / raw_bytes, "x raw"),
        Figure(f"alt {label} HGET latency", lookup, "us"),
    ]


def _latency_us(call: Callable[[], object], samples: int = 2000) -> float:
    """Mean round trip of one call, to compare layouts (absolute values include the network)."""
    start = time.perf_counter()
    for _ in range(samples):
        call()
    return (time.perf_counter() - start) / samples * 1e6


def _print(figures: list[Figure]) -> None:
    width = max(len(f.name) for f in figures)
    print(f"{'figure':<{width}}  {'value':>12}  {'unit':<8}  {'target':<10}  held")
    for f in figures:
        held = "-" if f.held is None else ("yes" if f.held else "NO")
        print(f"{f.name:<{width}}  {f.value:>12,.2f}  {f.unit:<8}  {f.target or '-':<10}  {held}")


@contextmanager
def _server_url(url: str | None) -> Iterator[str]:
    """The given server, or a fresh one configured like the embedded server (AOF + RDB)."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="store-bench-") as folder:
        server = start_server(Path(folder), persistent=True)
        try:
            yield server.connection_url
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000, help="embeddings to write")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimensions")
    parser.add_argument("--batch-size", type=int, default=4096, help="users per MSET")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redis-url",
        help="measure this server instead of a fresh one (writes, then deletes, keys of the "
        "versions b4, b2, h4, n4, u4 and k4; memory figures are noisy if others use it)",
    )
    parser.add_argument(
        "--alternatives", action="store_true", help="measure layout alternatives even if held"
    )
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    raw_bytes = args.dim * 4

    with _server_url(args.redis_url) as url, sync_client(url) as client:
        server = client.info("server")
        version = server.get("valkey_version") or server["redis_version"]
        print(f"server {version}, {args.users:,} users x {args.dim} dims, raw {raw_bytes} B/user")
        figures = _publish(client, args, raw_bytes)
        missed = next(f for f in figures if f.name == "memory ratio float32").held is False
        if missed or args.alternatives:
            figures += _alternatives(client, args, raw_bytes)
    _print(figures)
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")


if __name__ == "__main__":
    with sigterm_unwinds():
        main()
