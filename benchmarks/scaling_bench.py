"""Cost against size: how training, publishing, Redis memory and API latency grow with users.

For each ``--sizes`` count of synthetic users (``encoder_service/data/synthetic.py``), in one
process on one machine, with a throwaway Valkey per size:

- **training time per epoch**: ``train_version`` for ``--epochs`` epochs in this process with
  ``--train-threads`` torch threads (default 1, so that the curve measures work rather than how
  threads share cores with other programs); seconds per epoch = training rows / the run's rows
  per second of optimisation. With ``--train-processes N`` also ``encoder-service train`` under
  ``torchrun --nproc-per-node=N`` (DDP over gloo, one thread per process) on the same data;
- **publish time**: ``publish_version`` of the training snapshot (encode with onnxruntime, write
  embeddings and feature states), one process;
- **Redis memory per user**: ``INFO memory`` ``used_memory`` after the publish minus before,
  over the users: one embedding plus one feature state each;
- **API p99**: ``encoder-service serve`` (one worker) answering single-user JSON GETs of random
  users, paced at a fixed ``--api-rate`` by the open-loop client of ``benchmarks/serving/``, so
  latency is counted from each request's scheduled time; the median of ``--api-repeats`` runs.

Then each curve's growth exponent: the slope of a least-squares line through
(log users, log cost). Targets: training, publish and total memory grow linearly or better
(exponent <= 1.1, which leaves room for timing noise); API p99 stays flat (exponent <= 0.1).
Small sizes carry fixed costs (start-up, warm-up), which pulls exponents below 1: the figures
that matter come from the full sizes.

    python benchmarks/scaling_bench.py --sizes 2000 10000          # quick check, a few minutes
    python benchmarks/scaling_bench.py --json benchmarks/results/scaling.json \\
        --plot benchmarks/results/scaling.png                       # 10k, 100k, 1M users
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))

from serving import loadgen  # noqa: E402
from serving.loadgen import RequestSpec  # noqa: E402
from serving_bench import free_port, python_env, server, service_cmd  # noqa: E402

from encoder_service.data.synthetic import generate  # noqa: E402
from encoder_service.data.tables import Dataset, write_tables  # noqa: E402
from encoder_service.publish import publish_version  # noqa: E402
from encoder_service.redis_connection import sigterm_unwinds, start_server, sync_client  # noqa: E402
from encoder_service.training.pipeline import train_version  # noqa: E402
from encoder_service.training.train import TrainConfig  # noqa: E402

LINEAR_EXPONENT = 1.1
FLAT_EXPONENT = 0.1
API_SAMPLE_IDS = 20_000
"""Users the load generator picks from, drawn uniformly from all users of the size."""
PACED_CONNECTIONS = 64
VERSION = "scale"


@dataclass
class SizeResult:
    """What one size measured."""

    users: int
    events: int
    generate_s: float
    train_epoch_s: float
    train_epoch_cpu_s: float
    ddp_epoch_s: float
    """Seconds per epoch under torchrun; NaN when not measured."""
    ddp_epoch_cpu_s: float
    """CPU seconds per epoch under torchrun, all ranks together; NaN when not measured."""
    publish_s: float
    publish_cpu_s: float
    """CPU seconds of the publish: this process (encoding, client) plus the Redis server."""
    redis_bytes: float
    api_p50_ms: float
    api_p99_ms: float
    api_rps: float
    api_errors: int

    @property
    def redis_bytes_per_user(self) -> float:
        return self.redis_bytes / self.users


@dataclass
class Curve:
    """One cost against users, with its growth exponent and the target it is held to."""

    name: str
    unit: str
    field: str
    max_exponent: float
    judged: bool = True
    """False for wall-clock times: on a shared machine they follow the other load as much as
    the work, so they are printed beside the CPU time that is held to the target."""


CURVES = (
    Curve("training CPU per epoch", "CPU s", "train_epoch_cpu_s", LINEAR_EXPONENT),
    Curve("training CPU per epoch, torchrun", "CPU s", "ddp_epoch_cpu_s", LINEAR_EXPONENT),
    Curve("training wall time per epoch", "s", "train_epoch_s", LINEAR_EXPONENT, False),
    Curve("training wall time per epoch, torchrun", "s", "ddp_epoch_s", LINEAR_EXPONENT, False),
    Curve("publish CPU (client + Redis)", "CPU s", "publish_cpu_s", LINEAR_EXPONENT),
    Curve("publish wall time", "s", "publish_s", LINEAR_EXPONENT, False),
    Curve("redis memory", "bytes", "redis_bytes", LINEAR_EXPONENT),
    Curve("API p99, single GET", "ms", "api_p99_ms", FLAT_EXPONENT),
)


def points(results: list[SizeResult], curve: Curve) -> tuple[list[int], list[float]]:
    """The sizes where ``curve`` was measured, and its values there."""
    measured = [r for r in results if not math.isnan(getattr(r, curve.field))]
    return [r.users for r in measured], [getattr(r, curve.field) for r in measured]


def curves(results: list[SizeResult]) -> list[Curve]:
    """The curves measured at two sizes or more in this run (torchrun's is optional)."""
    return [c for c in CURVES if len(points(results, c)[0]) >= 2]


def exponent(users: list[int], values: list[float]) -> float:
    """Slope of the least-squares line through (log users, log value)."""
    if len(users) < 2 or min(values) <= 0:
        return math.nan
    slope, _ = np.polyfit(np.log(users), np.log(values), 1)
    return float(slope)


def measure_size(args: argparse.Namespace, users: int, tmp: Path) -> SizeResult:
    print(f"\n== {users:,} users", flush=True)
    # First, while this process holds no data: each torchrun rank builds the whole data set.
    timed = args.train_processes and users <= args.torchrun_max_users
    ddp_epoch_s, ddp_epoch_cpu_s = (
        torchrun_epoch_seconds(args, users, tmp) if timed else (math.nan, math.nan)
    )
    started = time.perf_counter()
    dataset = synthetic(args, users)
    generate_s = time.perf_counter() - started
    print(f"generated {len(dataset.events):,} events in {generate_s:.1f} s", flush=True)

    config = TrainConfig(
        embedding_dim=args.dim,
        epochs=args.epochs,
        patience=args.epochs,
        seed=args.seed,
        num_threads=args.train_threads,
    )
    trained = train_version(
        dataset, version=VERSION, out_dir=tmp / "models", config=config, progress=False
    )
    metrics = trained.manifest["metrics"]
    train_epoch_s = metrics["n_train"] / metrics["users_per_second"]
    train_epoch_cpu_s = metrics["n_train"] / metrics["users_per_cpu_second"]
    print(
        f"training: {train_epoch_s:.2f} s per epoch, {train_epoch_cpu_s:.2f} CPU s "
        f"({metrics['n_train']:,} rows)",
        flush=True,
    )
    n_events = len(dataset.events)
    del dataset
    gc.collect()

    valkey = start_server(tmp / f"valkey-{users}", persistent=False)
    try:
        client = sync_client(valkey.connection_url)
        before = client.info("memory")["used_memory"]
        cpu_before = time.process_time() + redis_cpu_s(client)
        report = publish_version(
            client,
            trained.artifacts(),
            trained.user_ids,
            trained.states,
            features=trained.features,
            batch_size=args.publish_batch_size,
            progress=False,
        )
        publish_cpu_s = time.process_time() + redis_cpu_s(client) - cpu_before
        redis_bytes = client.info("memory")["used_memory"] - before
        print(
            f"publish: {report.seconds:.2f} s ({report.users_per_second:,.0f} users/s), "
            f"{publish_cpu_s:.2f} CPU s, "
            f"Redis +{redis_bytes / users:,.0f} bytes per user",
            flush=True,
        )
        ids = random.Random(args.seed).sample(trained.user_ids, min(API_SAMPLE_IDS, users))
        api = measure_api(args, valkey.connection_url, ids, tmp)
    finally:
        valkey.stop()
    print(
        f"API at {args.api_rate:g} req/s (median of {args.api_repeats}): p50 {api.p50_ms:.2f} ms, "
        f"p99 {api.p99_ms:.2f} ms, "
        f"{api.errors} errors",
        flush=True,
    )
    return SizeResult(
        users=users,
        events=n_events,
        generate_s=generate_s,
        train_epoch_s=train_epoch_s,
        train_epoch_cpu_s=train_epoch_cpu_s,
        ddp_epoch_s=ddp_epoch_s,
        ddp_epoch_cpu_s=ddp_epoch_cpu_s,
        publish_s=report.seconds,
        publish_cpu_s=publish_cpu_s,
        redis_bytes=redis_bytes,
        api_p50_ms=api.p50_ms,
        api_p99_ms=api.p99_ms,
        api_rps=api.rps,
        api_errors=api.errors,
    )


def synthetic(args: argparse.Namespace, users: int) -> Dataset:
    """The data set of one size: ``users`` users over a catalogue of ``--items`` items."""
    return generate(users, seed=args.seed, n_items=args.items)


def redis_cpu_s(client: Any) -> float:
    """CPU seconds the Redis server has used since it started (``INFO cpu``)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def torchrun_epoch_seconds(args: argparse.Namespace, users: int, tmp: Path) -> tuple[float, float]:
    """Wall and CPU seconds per epoch of ``encoder-service train`` under torchrun, from its
    manifest (rank 0's figures; the CPU time is rank 0's times the number of ranks, which each
    do the same share of the work).

    The ranks read the same data set from Parquet files written here (the CLI's generic input),
    which are deleted afterwards.
    """
    home = tmp / "torchrun"
    tables = write_tables(synthetic(args, users), tmp / "tables", "parquet")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "ENCODER_HOME": str(home),
        "ENCODER_SEED": str(args.seed),
        "ENCODER_EMBEDDING_DIM": str(args.dim),
    }
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc-per-node={args.train_processes}",
        *("-m", "encoder_service.cli", "train"),
        *(arg for name, path in tables.items() for arg in (f"--{name}", str(path))),
        *("--epochs", str(args.epochs), "--no-publish", "--version", VERSION),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for path in tables.values():
        path.unlink()
    if done.returncode:
        raise RuntimeError(f"torchrun training failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((home / "models" / VERSION / "manifest.json").read_text())["metrics"]
    seconds = metrics["n_train"] / metrics["users_per_second"]
    cpu_seconds = metrics["n_train"] / metrics["users_per_cpu_second"] * args.train_processes
    print(
        f"training under torchrun x{args.train_processes}: {seconds:.2f} s per epoch, "
        f"{cpu_seconds:.2f} CPU s",
        flush=True,
    )
    return seconds, cpu_seconds


@dataclass
class ApiLatency:
    """The medians over ``--api-repeats`` paced runs: one run's p99 under other programs' load
    swings by several times, the median of a few much less."""

    p50_ms: float
    p99_ms: float
    rps: float
    errors: int


def measure_api(args: argparse.Namespace, redis_url: str, ids: list[str], tmp: Path) -> ApiLatency:
    """Latency of single-user GETs at a fixed rate, from a separate client process."""
    ids_file = tmp / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    port = free_port()
    env = python_env(redis_url, tmp / "home", args.dim)
    with server("scaling-api", service_cmd(port, 1), port, "/readyz", env, tmp):
        runs = [
            loadgen.run_client(
                loadgen.client_argv(
                    "paced",
                    port,
                    RequestSpec("GET", "/v1/users/{id}/embedding"),
                    ids_file,
                    connections=PACED_CONNECTIONS,
                    duration_s=args.api_duration,
                    warmup_s=args.api_warmup,
                    rate=args.api_rate,
                )
            )
            for _ in range(args.api_repeats)
        ]
    return ApiLatency(
        p50_ms=float(np.median([r.p50_ms for r in runs])),
        p99_ms=float(np.median([r.p99_ms for r in runs])),
        rps=min(r.rps for r in runs),
        errors=sum(r.errors for r in runs),
    )


def figures_of(results: list[SizeResult], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every figure printed, with the target it is held against (None where it has none)."""
    figures: list[dict[str, Any]] = []

    def add(name: str, value: float, unit: str, target: str | None, held: bool | None) -> None:
        figures.append({"name": name, "value": value, "unit": unit, "target": target, "held": held})

    for r in results:
        prefix = f"{r.users}_users"
        add(f"{prefix}.events", r.events, "count", None, None)
        add(f"{prefix}.generate_s", r.generate_s, "s", None, None)
        add(f"{prefix}.train_epoch_s", r.train_epoch_s, "s", None, None)
        add(f"{prefix}.train_epoch_cpu_s", r.train_epoch_cpu_s, "CPU s", None, None)
        if not math.isnan(r.ddp_epoch_s):
            add(f"{prefix}.torchrun_train_epoch_s", r.ddp_epoch_s, "s", None, None)
            add(f"{prefix}.torchrun_train_epoch_cpu_s", r.ddp_epoch_cpu_s, "CPU s", None, None)
        add(f"{prefix}.publish_s", r.publish_s, "s", None, None)
        add(f"{prefix}.publish_cpu_s", r.publish_cpu_s, "CPU s", None, None)
        add(f"{prefix}.publish_users_per_s", r.users / r.publish_s, "users/s", None, None)
        add(f"{prefix}.redis_bytes_per_user", r.redis_bytes_per_user, "bytes", None, None)
        add(f"{prefix}.api_p50_ms", r.api_p50_ms, "ms", None, None)
        add(f"{prefix}.api_p99_ms", r.api_p99_ms, "ms", None, None)
        wanted = 0.95 * args.api_rate  # the server kept up with the offered load
        add(f"{prefix}.api_rps", r.api_rps, "req/s", f">= {wanted:g}", r.api_rps >= wanted)
        add(f"{prefix}.api_errors", r.api_errors, "count", "== 0", r.api_errors == 0)
    for curve in curves(results):
        slope = exponent(*points(results, curve))
        if not curve.judged:
            add(f"exponent.{curve.field}", slope, "log-log slope", None, None)
            continue
        held = None if math.isnan(slope) else slope <= curve.max_exponent
        add(f"exponent.{curve.field}", slope, "log-log slope", f"<= {curve.max_exponent}", held)
    return figures


def print_tables(results: list[SizeResult], figures: list[dict[str, Any]]) -> None:
    print(
        "\n| users | events | train s/epoch (CPU s) | torchrun s/epoch (CPU s) | publish s (CPU s) "
        "| Redis bytes/user | API p50 ms | API p99 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        torchrun = (
            "-" if math.isnan(r.ddp_epoch_s) else f"{r.ddp_epoch_s:.2f} ({r.ddp_epoch_cpu_s:.2f})"
        )
        print(
            f"| {r.users:,} | {r.events:,} | {r.train_epoch_s:.2f} ({r.train_epoch_cpu_s:.2f}) "
            f"| {torchrun} | {r.publish_s:.2f} ({r.publish_cpu_s:.2f}) "
            f"| {r.redis_bytes_per_user:,.0f} | {r.api_p50_ms:.2f} | {r.api_p99_ms:.2f} |"
        )
    print("\n| curve | exponent | target | held |\n|---|---:|---|---|")
    by_name = {f["name"]: f for f in figures}
    for curve in curves(results):
        f = by_name[f"exponent.{curve.field}"]
        held = "n/a" if f["held"] is None else ("yes" if f["held"] else "**no**")
        target = f["target"] or "(wall time: shown, not judged)"
        print(f"| {curve.name} | {f['value']:.2f} | {target} | {held} |")


def plot(results: list[SizeResult], figures: list[dict[str, Any]], path: Path) -> None:
    """A 2x2 grid of log-log panels (both training curves share one), measured points and the
    fitted line with its exponent, against a dotted line of exponent 1 (or 0 for latency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {f["name"]: f for f in figures}
    panels: dict[str, list[Curve]] = {}
    for curve in curves(results):
        key = (
            curve.field.split("_")[0]
            if curve.field.startswith(("train", "ddp", "publish"))
            else curve.field
        )
        key = "train" if key == "ddp" else key
        panels.setdefault(key, []).append(curve)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, group in zip(axes.flat, panels.values(), strict=False):
        for curve in group:
            sizes, measured = points(results, curve)
            users, values = np.array(sizes, dtype=float), np.array(measured, dtype=float)
            slope = by_name[f"exponent.{curve.field}"]["value"]
            style = "o-" if curve.judged else "s--"
            (line,) = ax.loglog(users, values, style, label=f"{curve.name}: exponent {slope:.2f}")
            reference = values[0] * (users / users[0]) ** (1.0 if curve.max_exponent > 1 else 0.0)
            ax.loglog(users, reference, ":", color=line.get_color(), alpha=0.6)
        first = group[0]
        ax.set_title(f"{first.name.split(',')[0]} (target: exponent <= {first.max_exponent})")
        ax.set_xlabel("users")
        ax.set_ylabel(first.unit)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("cost against users (dotted: linear, or flat for latency)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="User counts to measure (default: 10000 100000 1000000).",
    )
    parser.add_argument("--epochs", type=int, default=2, help="Epochs timed per size.")
    parser.add_argument(
        "--train-threads", type=int, default=1, help="Torch threads of in-process training."
    )
    parser.add_argument(
        "--train-processes",
        type=int,
        default=0,
        help="Also time training under torchrun with this many processes (0: skip).",
    )
    parser.add_argument(
        "--torchrun-max-users",
        type=int,
        default=200_000,
        help="Largest size timed under torchrun: every rank holds the whole data set "
        "(about 16 KB per user while features are built), so N ranks need N times the memory.",
    )
    parser.add_argument(
        "--items",
        type=int,
        default=20_000,
        help="Catalogue size, the same at every size so that the curves show the cost of users "
        "alone (the item head's width grows with the catalogue up to its 20,000-item cap).",
    )
    parser.add_argument("--dim", type=int, default=64, help="Embedding dimension.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--publish-batch-size", type=int, default=4096)
    parser.add_argument("--api-rate", type=float, default=500.0, help="Paced GETs per second.")
    parser.add_argument("--api-duration", type=float, default=10.0, help="Measured seconds.")
    parser.add_argument("--api-warmup", type=float, default=2.0, help="Unmeasured seconds first.")
    parser.add_argument(
        "--api-repeats", type=int, default=3, help="Paced runs per size; medians are reported."
    )
    parser.add_argument("--json", type=Path, default=None, help="Write every figure here.")
    parser.add_argument("--plot", type=Path, default=None, help="Write the PNG plot here.")
    args = parser.parse_args(argv)
    if sorted(set(args.sizes)) != args.sizes or min(args.sizes) < 100:
        parser.error("--sizes must be increasing, distinct and at least 100")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    started = time.monotonic()
    results: list[SizeResult] = []
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp_name:
        for users in args.sizes:
            size_dir = Path(tmp_name) / str(users)
            size_dir.mkdir()
            results.append(measure_size(args, users, size_dir))
            gc.collect()
    figures = figures_of(results, args)
    for name, value, unit in (
        ("load_average_1min_at_start", load, "processes"),
        ("elapsed", time.monotonic() - started, "s"),
    ):
        figures.append({"name": name, "value": value, "unit": unit, "target": None, "held": None})
    print_tables(results, figures)
    if args.plot:
        plot(results, figures, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "benchmark": "scaling",
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "sizes": [
                {**asdict(r), "redis_bytes_per_user": r.redis_bytes_per_user} for r in results
            ],
            "figures": figures,
        }
        args.json.write_text(json.dumps(document, indent=2))
        print(f"figures: {args.json}")
    missed = [f["name"] for f in figures if f["held"] is False]
    if missed:
        print(f"missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    with sigterm_unwinds():
        sys.exit(main())
