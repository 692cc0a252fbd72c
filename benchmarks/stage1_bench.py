"""Stage 1 in one run on one machine: features, training, encoding, publishing, Redis memory.

Prints a table and, with ``--json PATH``, writes every figure with the target it is held against:

- feature build throughput (users/s) for the whole synthetic data set;
- autoencoder training throughput (users/s per epoch);
- encode throughput of onnxruntime vs torch eager at batch 1 and 256, and their ratio
  (target: onnxruntime >= 3x torch at batch 1, no slower at batch 256);
- publish throughput into Redis, embeddings alone and with feature states
  (target: >= 100,000 users/s for the embeddings);
- Redis memory per published user for one version, vs the raw vector bytes (target <= 1.3x).

Example::

    python benchmarks/stage1_bench.py --users 100000 --json benchmarks/results/stage1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from encoder_service.data.synthetic import generate  # noqa: E402
from encoder_service.encoder import Encoder  # noqa: E402
from encoder_service.publish import publish_version  # noqa: E402
from encoder_service.redis_connection import sigterm_unwinds, start_server, sync_client  # noqa: E402
from encoder_service.store import EmbeddingStore  # noqa: E402
from encoder_service.training.pipeline import prepare_features, train_version  # noqa: E402
from encoder_service.training.train import TrainConfig, train_autoencoder  # noqa: E402


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str | None = None
    held: bool | None = None


def _per_call_seconds(fn, batch: np.ndarray, min_seconds: float) -> float:
    """Median-free but warm: repeat calls until ``min_seconds`` pass, return seconds per call."""
    for _ in range(20):
        fn(batch)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        fn(batch)
        calls += 1
    return (time.perf_counter() - started) / calls


def bench_training(args: argparse.Namespace, figures: list[Figure], workdir: Path):
    started = time.perf_counter()
    dataset = generate(args.users, seed=args.seed)
    generate_s = time.perf_counter() - started
    figures.append(Figure("synthetic generation", args.users / generate_s, "users/s"))

    started = time.perf_counter()
    prepared = prepare_features(dataset, seed=args.seed)
    build_s = time.perf_counter() - started
    figures.append(Figure("feature build (states + vectors)", args.users / build_s, "users/s"))

    config = TrainConfig(epochs=args.epochs, patience=args.epochs, seed=args.seed)
    result = train_autoencoder(
        prepared.features, prepared.schema, config, items=prepared.interactions, progress=False
    )
    epoch_seconds = [row["seconds"] for row in result.history]
    n_train = result.metrics["n_train"]
    figures.append(
        Figure("training throughput", n_train / float(np.median(epoch_seconds)), "users/s")
    )
    trained = train_version(
        dataset,
        version="bench",
        out_dir=workdir,
        config=TrainConfig(epochs=1, seed=args.seed),
        progress=False,
    )
    return trained, result.model


def bench_encoding(trained, model, figures: list[Figure], min_seconds: float) -> None:
    encoder = Encoder(trained.artifacts())
    torch.set_num_threads(1)
    model.eval()

    def torch_encode(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(torch.from_numpy(batch)).numpy()

    for batch_size in (1, 256):
        batch = np.ascontiguousarray(trained.features[:batch_size])
        ort_s = _per_call_seconds(encoder.encode_features, batch, min_seconds)
        torch_s = _per_call_seconds(torch_encode, batch, min_seconds)
        ratio = torch_s / ort_s
        figures.append(Figure(f"onnxruntime batch {batch_size}", ort_s * 1e6, "us/call"))
        figures.append(Figure(f"torch eager batch {batch_size}", torch_s * 1e6, "us/call"))
        target, held = (">= 3", ratio >= 3) if batch_size == 1 else (">= 1", ratio >= 0.95)
        figures.append(
            Figure(f"speed-up onnxruntime/torch batch {batch_size}", ratio, "x", target, held)
        )


def bench_publish(trained, figures: list[Figure], workdir: Path, redis_url: str | None) -> None:
    artifacts = trained.artifacts()
    encoder = Encoder(artifacts)
    embeddings = encoder.encode_features(trained.features)
    n = len(trained.user_ids)
    server = None if redis_url else start_server(workdir / "valkey", persistent=False)
    try:
        client = sync_client(redis_url or server.connection_url)
        client.flushdb()
        store = EmbeddingStore(client)
        before = client.info("memory")["used_memory"]
        started = time.perf_counter()
        store.write_embeddings("bench", trained.user_ids, embeddings, dtype="float32")
        write_s = time.perf_counter() - started
        per_user = (client.info("memory")["used_memory"] - before) / n
        raw = embeddings.shape[1] * 4
        figures.append(
            Figure(
                "publish embeddings (pre-encoded)",
                n / write_s,
                "users/s",
                ">= 100000",
                n / write_s >= 100_000,
            )
        )
        figures.append(Figure("redis memory per user", per_user, "bytes"))
        figures.append(
            Figure(
                "redis memory vs raw vector", per_user / raw, "x", "<= 1.3", per_user / raw <= 1.3
            )
        )
        cases = [
            (
                "publish: encode + write embeddings",
                dict(features=trained.features, write_states=False),
                100_000,
            ),
            ("publish: + feature states", dict(features=trained.features), None),
            ("publish from states (vectorise too)", dict(write_states=False), None),
        ]
        for name, options, target in cases:
            client.flushdb()
            report = publish_version(
                client, artifacts, trained.user_ids, trained.states, progress=False, **options
            )
            rate = report.users_per_second
            figures.append(
                Figure(
                    name,
                    rate,
                    "users/s",
                    f">= {target}" if target else None,
                    rate >= target if target else None,
                )
            )
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000, help="synthetic users")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed for throughput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time per encode case")
    parser.add_argument("--redis-url", default=None, help="use this server (it is FLUSHED)")
    parser.add_argument("--json", type=Path, default=None, help="write figures here")
    args = parser.parse_args()

    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trained, model = bench_training(args, figures, workdir)
        bench_encoding(trained, model, figures, args.min_seconds)
        bench_publish(trained, figures, workdir, args.redis_url)

    print(f"stage 1 benchmark, {args.users:,} synthetic users")
    print(f"{'figure':<44}{'value':>14}  {'unit':<9}{'target':<10}held")
    for f in figures:
        held = "" if f.held is None else ("yes" if f.held else "NO")
        print(f"{f.name:<44}{f.value:>14,.2f}  {f.unit:<9}{f.target or '':<10}{held}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"users": args.users, "figures": [f.__dict__ for f in figures]}, indent=2)
        )


if __name__ == "__main__":
    with sigterm_unwinds():
        main()
