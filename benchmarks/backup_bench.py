"""Backup and restore at scale: throughput and memory of ``export`` and ``import``.

Fills a fresh Valkey with N users (an embedding, a feature state and a refresh meta each) and a
registered version, exports the version to Parquet, imports it into a second fresh Valkey
(every value read back and compared by the import itself), and reports users/s each way, the
backup's size, and how much the process's resident memory grew during each direction: the
figure that shows the streaming holds, since it must not grow with N.

    python benchmarks/backup_bench.py --users 1000000 --json benchmarks/results/backup.json

States are random bytes of ``--state-bytes`` (a real state's size depends on the number of
categories and items; 2 KiB is typical of the synthetic data).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from encoder_service.backup import export_version, import_version  # noqa: E402
from encoder_service.redis_connection import sigterm_unwinds, start_server, sync_client  # noqa: E402
from encoder_service.registry import Registry  # noqa: E402
from encoder_service.store import EmbeddingStore, encode_meta  # noqa: E402

VERSION = "bk1"
THROUGHPUT_TARGET = 1_000_000 / 300  # users/s: a million users within five minutes
MEMORY_TARGET_MIB = 400.0  # resident growth during a direction, whatever N is
FILL_BATCH = 10_000
T = TypeVar("T")


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str | None = None
    held: bool | None = None


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _measured(call: Callable[[], T]) -> tuple[T, float, float]:
    """``call()``, its wall time, and the peak resident growth while it ran (sampled)."""
    baseline = peak = _rss_mib()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = call()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    return result, elapsed, max(peak, _rss_mib()) - baseline


def _fill(client: object, users: int, dim: int, state_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    store = EmbeddingStore(client)  # type: ignore[arg-type]
    manifest = {
        "version": VERSION,
        "embedding_dim": dim,
        "dtype": "float32",
        "schema_hash": "bench",
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    registry = Registry(client)  # type: ignore[arg-type]
    registry.register(manifest, rng.bytes(2**20), rng.bytes(2**18), by="bench")
    registry.promote(VERSION, by="bench")
    for start in range(0, users, FILL_BATCH):
        ids = [f"user{i:08d}" for i in range(start, min(users, start + FILL_BATCH))]
        store.write_embeddings(VERSION, ids, rng.standard_normal((len(ids), dim)))
        blob = rng.bytes(state_bytes * len(ids))  # distinct per user, so sizes are honest
        store.write_states(
            ids, [blob[i : i + state_bytes] for i in range(0, len(blob), state_bytes)]
        )
        meta = encode_meta(1.7e9, {"events:{0}": "1-0"})
        client.mset({f"meta:{{{u}}}": meta for u in ids})  # type: ignore[attr-defined]


def _at_least(name: str, value: float, unit: str, target: float) -> Figure:
    return Figure(name, value, unit, f">= {target:,.0f}", value >= target)


def _at_most(name: str, value: float, unit: str, target: float) -> Figure:
    return Figure(name, value, unit, f"<= {target:,.0f}", value <= target)


@contextmanager
def _servers() -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="backup-bench-") as folder:
        source = start_server(Path(folder) / "a", persistent=False)
        target = start_server(Path(folder) / "b", persistent=False)
        try:
            yield source.connection_url, target.connection_url
        finally:
            source.stop()
            target.stop()


def run(args: argparse.Namespace) -> list[Figure]:
    with _servers() as (source_url, target_url), tempfile.TemporaryDirectory() as scratch:
        source, target = sync_client(source_url), sync_client(target_url)
        _fill(source, args.users, args.dim, args.state_bytes, args.seed)
        folder = Path(scratch) / "backup"
        report, export_s, export_mib = _measured(
            lambda: export_version(source, VERSION, folder, chunk_size=args.chunk_size)
        )
        restored, import_s, import_mib = _measured(
            lambda: import_version(target, folder, chunk_size=args.chunk_size)
        )
        size = sum(f.stat().st_size for f in folder.iterdir())
        complete = restored.users == report.users == args.users
        return [
            _at_least("export", report.users / export_s, "users/s", THROUGHPUT_TARGET),
            _at_least("import + verify", restored.users / import_s, "users/s", THROUGHPUT_TARGET),
            _at_most("export memory growth", export_mib, "MiB", MEMORY_TARGET_MIB),
            _at_most("import memory growth", import_mib, "MiB", MEMORY_TARGET_MIB),
            Figure("backup size", size / args.users, "B/user"),
            Figure("every user restored", float(complete), "bool", "= 1", complete),
        ]


def _print(figures: list[Figure]) -> None:
    width = max(len(f.name) for f in figures)
    print(f"{'figure':<{width}}  {'value':>12}  {'unit':<8}  {'target':<12}  held")
    for f in figures:
        held = "-" if f.held is None else ("yes" if f.held else "NO")
        print(f"{f.name:<{width}}  {f.value:>12,.2f}  {f.unit:<8}  {f.target or '-':<12}  {held}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000, help="users to back up")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimensions")
    parser.add_argument("--state-bytes", type=int, default=2048, help="size of each state")
    parser.add_argument("--chunk-size", type=int, default=1000, help="users per SCAN/MGET")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    print(
        f"{args.users:,} users x ({args.dim} dims + {args.state_bytes} B state), "
        f"chunks of {args.chunk_size}"
    )
    figures = run(args)
    _print(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")


if __name__ == "__main__":
    with sigterm_unwinds():
        main()
