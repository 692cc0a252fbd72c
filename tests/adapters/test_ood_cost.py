"""The harness's OOD scenario and infrastructure-cost table on small synthetic data.

Embeddings here are drawn, not encoded: the scenario's job is to score whatever embeddings a
version produced, so a planted far-away cluster must be found (AUROC ~1) and fresh draws from
the training distribution must not (AUROC ~0.5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from downstream_adapters.evaluate import cost, scenarios
from downstream_adapters.evaluate.cli import main
from downstream_adapters.evaluate.data import Tables
from downstream_adapters.evaluate.harness import Task
from downstream_adapters.heads import LinearHead, MLPHead

DIM = 16


def _users(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, means a little apart, unit noise."""
    y = np.where(rng.random(n) < 0.4, "a", "b")
    x = rng.standard_normal((n, DIM)) + np.where(y == "a", 0.5, -0.5)[:, None]
    return x.astype(np.float32), y


def _tables(n_users: int, rng: np.random.Generator) -> Tables:
    users = [f"u{i}" for i in range(n_users)]
    rows = []
    for user in users:
        for _ in range(int(rng.integers(5, 15))):
            rows.append((user, f"i{rng.integers(0, 40)}", float(rng.integers(8e8, 9e8)), 3.0))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "weight"])
    categories = {f"i{i}": (("drama",) if i % 2 else ("comedy", "action")) for i in range(40)}
    return Tables(events, categories, pd.DataFrame(index=pd.Index(users, name="user_id")))


def test_ood_separates_a_far_cluster_and_not_in_distribution_draws() -> None:
    rng = np.random.default_rng(0)
    x, y = _users(300, rng)
    far = rng.standard_normal((100, DIM)).astype(np.float32) + 6.0
    same, _ = _users(100, rng)
    heads = {"LinearHead": lambda s: LinearHead(seed=s), "MLPHead": lambda s: MLPHead(seed=s)}
    out = scenarios.ood(
        x, {"bot": far, "shuffled": same, "other": far}, Task("t", y), heads=heads, k=3
    )
    assert set(out) == {f"{h}, {m}" for h in heads for m in ("knn", "mahalanobis", "energy")}
    for head in heads:
        for method in ("knn", "mahalanobis"):
            row = out[f"{head}, {method}"]
            assert row["bot"]["auroc"] > 0.99 and row["bot"]["held"] is True
            assert 0.4 < row["shuffled"]["auroc"] < 0.6 and row["shuffled"]["held"] is False
            assert row["other"]["target"] is None and row["other"]["held"] is None
            assert row["bot"]["target"] == scenarios.OOD_TARGET


def test_cost_table_measures_every_pipeline() -> None:
    rng = np.random.default_rng(1)
    tables = _tables(80, rng)
    users = list(tables.labels.index)
    embedding = rng.standard_normal((80, DIM)).astype(np.float32)
    tasks = [Task(n, np.where(rng.random(80) < 0.5, "p", "q")) for n in ("one", "two", "three")]
    state = np.full(80, 1000)
    rows = cost.measure(tables, users, embedding, tasks, state_bytes=state, repeats=1)
    assert list(rows) == [
        "raw items + LR per task",
        "svd-64 + LR per task",
        "aggregates + LR per task",
        *cost.SHARED_ROWS,
    ]
    per_task, shared = rows["raw items + LR per task"], rows[cost.SHARED_ROWS[0]]
    assert per_task["n_models"] == 3 and rows[cost.SHARED_ROWS[1]]["n_models"] == 1
    # Each of the three pipelines stores its own copy of the sparse item vector.
    one_copy = cost._nbytes(cost.baselines.raw_items(tables, users)) / 80
    assert per_task["feature_bytes_per_user"] == pytest.approx(3 * one_copy)
    assert shared["feature_bytes_per_user"] == DIM * 4
    assert shared["stored_bytes_per_user"] == DIM * 4 + 1000
    assert all(r["cpu_us_per_user"] > 0 and r["model_bytes"] > 0 for r in rows.values())
    pairs = cost.comparisons(rows)
    assert len(pairs) == 2 * 3 * 3 and {p["baseline"] for p in pairs} == set(list(rows)[:3])


def test_cli_writes_ood_and_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    tables = _tables(90, rng)
    users = list(tables.labels.index)
    x, y = _users(90, rng)
    tables.events.to_csv(tmp_path / "events.csv", index=False)
    pd.DataFrame({"user_id": users, "kind": y}).to_csv(tmp_path / "labels.csv", index=False)
    np.savez(
        tmp_path / "emb.npz",
        user_ids=np.asarray(users),
        embeddings=x,
        version="syn",
        embedding_dim=DIM,
        schema_hash="sha256:0",
        state_bytes=np.full(90, 500),
        ood_bot=rng.standard_normal((40, DIM)).astype(np.float32) + 6.0,
    )
    args = [
        "--embeddings", str(tmp_path / "emb.npz"), "--events", str(tmp_path / "events.csv"),
        "--labels", str(tmp_path / "labels.csv"), "--folds", "3", "--shots", "5",
        "--repeats", "1", "--json", str(tmp_path / "out.json"), "--plots", str(tmp_path / "p"),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "OOD AUROC" in printed and "infrastructure cost of 1 tasks" in printed
    report = json.loads((tmp_path / "out.json").read_text())
    ood = report["scenarios"]["ood"]
    assert ood["target"] == 0.9 and ood["cases"] == {"bot": 40}
    assert ood["results"]["kind"]["LinearHead, mahalanobis"]["bot"]["held"] is True
    assert ood["default_method"] == "knn"
    assert ood["results"]["kind"]["LinearHead, knn"]["bot"]["held"] is True
    assert report["cost"]["rows"][cost.SHARED_ROWS[0]]["stored_bytes_per_user"] == DIM * 4 + 500
    assert (tmp_path / "p" / "ood.png").stat().st_size > 0
    assert (tmp_path / "p" / "cost.png").stat().st_size > 0


def test_cli_refuses_ood_embeddings_of_another_width(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tables = _tables(30, rng)
    users = list(tables.labels.index)
    tables.events.to_csv(tmp_path / "events.csv", index=False)
    pd.DataFrame({"user_id": users, "kind": ["a", "b"] * 15}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    x = rng.standard_normal((30, DIM)).astype(np.float32)
    np.savez(
        tmp_path / "emb.npz", user_ids=np.asarray(users), embeddings=x, version="syn",
        embedding_dim=DIM, schema_hash="sha256:0",
    )  # fmt: skip
    np.savez(tmp_path / "ood.npz", ood_bot=np.zeros((5, DIM + 1), dtype=np.float32))
    args = [
        "--embeddings", str(tmp_path / "emb.npz"), "--events", str(tmp_path / "events.csv"),
        "--labels", str(tmp_path / "labels.csv"), "--ood", str(tmp_path / "ood.npz"),
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="--ood: ood_bot has shape"):
        main(args)
