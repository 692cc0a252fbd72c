"""The Feast side of the serving benchmark; runs in Feast's own virtualenv, not the project's.

Feast pins versions of FastAPI, pandas and redis-py that need not agree with this project's, so
it lives in a virtualenv of its own and this script is the only code that imports it. It knows
nothing of ``encoder_service``: the benchmark hands it the users and vectors it published to its
own store, as files.

* ``load``: apply the generated feature repo and write the same vectors for the same users
  through ``FeatureStore.write_to_online_store`` (Feast's own serialisation and key layout).
* ``sdk``: call ``FeatureStore.get_online_features`` for one random user in a loop, in process,
  and print per-call latency percentiles and calls/s as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from feast import FeatureStore

FEATURE_VIEW = "user_embedding"
FEATURE_REF = f"{FEATURE_VIEW}:embedding"
RESULT_MARKER = "FEAST-RESULT "
WRITE_CHUNK = 20_000


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def load(repo: Path, ids_file: Path, vectors_file: Path) -> dict[str, float]:
    """Write every user's vector to the online store; returns rows and seconds taken."""
    store = FeatureStore(repo_path=str(repo))
    ids = ids_file.read_text().split()
    vectors = np.load(vectors_file)
    now = pd.Timestamp.now(tz="UTC")
    started = time.perf_counter()
    for start in range(0, len(ids), WRITE_CHUNK):
        stop = start + WRITE_CHUNK
        frame = pd.DataFrame(
            {
                "user_id": ids[start:stop],
                "embedding": list(vectors[start:stop]),
                "event_timestamp": now,
            }
        )
        store.write_to_online_store(FEATURE_VIEW, frame)
    return {"rows": len(ids), "seconds": time.perf_counter() - started}


def sdk(repo: Path, ids_file: Path, seconds: float, warmup_s: float) -> dict[str, float]:
    """Per-call latency of ``get_online_features`` for one random user, single-threaded.

    This is the best case for a Feast user: no HTTP, no JSON, the registry cached in process.
    """
    store = FeatureStore(repo_path=str(repo))
    ids = ids_file.read_text().split()
    rng = random.Random(0)
    latencies: list[float] = []
    clock = time.perf_counter
    warm_until = clock() + warmup_s
    stop = warm_until + seconds
    while (start := clock()) < stop:
        row = store.get_online_features(
            features=[FEATURE_REF], entity_rows=[{"user_id": rng.choice(ids)}]
        ).to_dict()
        if start >= warm_until:
            latencies.append(clock() - start)
        if row["embedding"][0] is None:
            raise RuntimeError(f"Feast returned no embedding for {row['user_id'][0]}")
    latencies.sort()
    return {
        "calls": len(latencies),
        "calls_per_s": len(latencies) / sum(latencies),
        "p50_ms": _percentile(latencies, 50) * 1e3,
        "p99_ms": _percentile(latencies, 99) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["load", "sdk"])
    parser.add_argument("--repo", type=Path, required=True, help="The generated feature repo.")
    parser.add_argument("--ids-file", type=Path, required=True, help="One user id a line.")
    parser.add_argument("--vectors", type=Path, help="The (users, dim) float32 .npy (load).")
    parser.add_argument("--seconds", type=float, default=10.0, help="Measured time (sdk).")
    parser.add_argument("--warmup", type=float, default=1.0, help="Unmeasured time (sdk).")
    args = parser.parse_args()
    if args.command == "load":
        if args.vectors is None:
            parser.error("load needs --vectors")
        result = load(args.repo, args.ids_file, args.vectors)
    else:
        result = sdk(args.repo, args.ids_file, args.seconds, args.warmup)
    print(RESULT_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
