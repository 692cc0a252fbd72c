"""Maps from one version's embedding space to another's, so a head trained on an old version can
read a new version's embeddings.

Two retrained encoders learn equivalent but rotated, reflected and rescaled spaces. A linear map
fitted on users present in both versions undoes most of that: orthogonal Procrustes (a rotation
plus one global scale, so distances keep their shape) or a ridge regression (any linear map,
more freedom, more risk of overfitting). Both are fitted here with numpy alone, because the
serving side applies them and must not need torch or scikit-learn. ``benchmarks/alignment_bench.py``
measures what a downstream head loses with each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import orjson
import redis

from encoder_service.registry import Registry, UnknownVersionError
from encoder_service.store import EmbeddingStore, decode_embedding, validate_version

Kind = Literal["procrustes", "ridge"]
KINDS: tuple[Kind, ...] = get_args(Kind)
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)
"""Ridge penalties tried, relative to the mean eigenvalue of the source covariance."""
HOLDOUT = 0.2


class AlignmentError(ValueError):
    """Too few shared users, mismatched shapes, or an unknown kind of map."""


@dataclass(frozen=True)
class AlignmentMap:
    """``target ≈ source @ weight + bias``, with its fit quality on held-out users."""

    source: str
    target: str
    kind: str
    weight: np.ndarray
    """float32, ``(source_dim, target_dim)``."""
    bias: np.ndarray
    """float32, ``(target_dim,)``."""
    metrics: dict[str, Any] = field(default_factory=dict)

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, source_dim)`` or ``(source_dim,)`` float32 -> the same in the target space."""
        return (np.asarray(embeddings, np.float32) @ self.weight + self.bias).astype(np.float32)

    def to_fields(self) -> dict[str, bytes]:
        """Plain Redis hash fields; the matrices as little-endian float32 bytes."""
        meta = {
            "source": self.source,
            "target": self.target,
            "kind": self.kind,
            "shape": list(self.weight.shape),
            "metrics": self.metrics,
        }
        return {
            "meta": orjson.dumps(meta),
            "weight": self.weight.astype("<f4").tobytes(),
            "bias": self.bias.astype("<f4").tobytes(),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, bytes]) -> AlignmentMap:
        meta = orjson.loads(fields["meta"])
        rows, cols = meta["shape"]
        weight = np.frombuffer(fields["weight"], "<f4").reshape(rows, cols).astype(np.float32)
        bias = np.frombuffer(fields["bias"], "<f4").astype(np.float32)
        return cls(meta["source"], meta["target"], meta["kind"], weight, bias, meta["metrics"])


def procrustes(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (semi-orthogonal when the dims differ) times one scale, after centring both."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    xs, ys = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(xs.T @ ys, full_matrices=False)
    scale = singular.sum() / max(float((xs * xs).sum()), 1e-12)
    weight = scale * (u @ vt)
    return weight, target_mean - source_mean @ weight


def ridge(source: np.ndarray, target: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Least squares with an L2 penalty ``alpha`` times the mean source variance."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    xs, ys = source - source_mean, target - target_mean
    gram = xs.T @ xs
    penalty = alpha * np.trace(gram) / len(gram)
    weight = np.linalg.solve(gram + penalty * np.eye(len(gram)), xs.T @ ys)
    return weight, target_mean - source_mean @ weight


def _quality(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """R² over all dims, and the mean cosine between a mapped vector and the true one."""
    residual = ((predicted - target) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    cos = (predicted * target).sum(1) / (
        np.linalg.norm(predicted, axis=1) * np.linalg.norm(target, axis=1) + 1e-12
    )
    return {"r2": float(1 - residual / max(total, 1e-12)), "cosine": float(cos.mean())}


def _fit_kind(
    kind: str, source: np.ndarray, target: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    return procrustes(source, target) if kind == "procrustes" else ridge(source, target, alpha)


def fit(
    source: np.ndarray,
    target: np.ndarray,
    kind: Kind,
    *,
    source_version: str = "",
    target_version: str = "",
    seed: int = 0,
) -> AlignmentMap:
    """Fit a ``kind`` map on row-aligned embeddings of the same users in both versions.

    A random fifth of the users is held out to measure the map (and to pick the ridge
    penalty); the map returned is then refitted on every user.

    Raises:
        AlignmentError: unknown kind, misaligned rows, or fewer users than twice the dims.
    """
    if kind not in KINDS:
        raise AlignmentError(f"unknown alignment kind {kind!r}; use one of {KINDS}")
    x = np.asarray(source, np.float64)
    y = np.asarray(target, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise AlignmentError(f"need row-aligned matrices, got {x.shape} and {y.shape}")
    if len(x) < 2 * max(x.shape[1], y.shape[1]):
        raise AlignmentError(
            f"{len(x)} shared users is too few to fit a {x.shape[1]}x{y.shape[1]} map"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, int(len(x) * HOLDOUT))
    test, train = order[:cut], order[cut:]
    best: tuple[float, float, dict[str, float]] | None = None
    for alpha in RIDGE_ALPHAS if kind == "ridge" else (0.0,):
        weight, bias = _fit_kind(kind, x[train], y[train], alpha)
        quality = _quality(x[test] @ weight + bias, y[test])
        if best is None or quality["r2"] > best[0]:
            best = (quality["r2"], alpha, quality)
    assert best is not None
    _, alpha, quality = best
    weight, bias = _fit_kind(kind, x, y, alpha)
    metrics: dict[str, Any] = {
        "users": len(x),
        "holdout_users": int(cut),
        "holdout_r2": quality["r2"],
        "holdout_cosine": quality["cosine"],
        "fitted_at": time.time(),
    }
    if kind == "ridge":
        metrics["alpha"] = alpha
    return AlignmentMap(
        source_version,
        target_version,
        kind,
        weight.astype(np.float32),
        bias.astype(np.float32),
        metrics,
    )


def _version_users(client: redis.Redis, version: str) -> list[str]:
    """Every user with an embedding under ``version`` (SCAN of its ``emb:<version>:{user}``)."""
    prefix = f"emb:{validate_version(version)}:{{"
    keys = client.scan_iter(f"{prefix}*", count=1000)
    return [key.decode()[len(prefix) : -1] for key in keys]


def shared_embeddings(
    client: redis.Redis, source: str, target: str, *, max_users: int = 100_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Row-aligned embeddings of (at most ``max_users``) users with a vector in both versions.

    A random sample keeps the fit bounded on a large keyspace.
    """
    registry, store = Registry(client), EmbeddingStore(client)
    manifests = {}
    for version in (source, target):
        manifest = registry.get(version)
        if manifest is None:
            raise UnknownVersionError(version)
        manifests[version] = manifest
    users = sorted(set(_version_users(client, source)))
    if len(users) > max_users:
        chosen = np.random.default_rng(seed).choice(len(users), max_users, replace=False)
        users = [users[i] for i in sorted(chosen)]
    raws = {v: store.read_embeddings(v, users) for v in (source, target)}
    rows: dict[str, list[np.ndarray]] = {source: [], target: []}
    for a, b in zip(raws[source], raws[target], strict=True):
        if a is None or b is None:
            continue
        for version, raw in ((source, a), (target, b)):
            m = manifests[version]
            rows[version].append(decode_embedding(raw, m["embedding_dim"], m["dtype"]))
    if not rows[source]:
        raise AlignmentError(f"no user has an embedding in both {source!r} and {target!r}")
    return np.stack(rows[source]), np.stack(rows[target])


def align_versions(
    client: redis.Redis, source: str, target: str, kind: Kind, *, max_users: int = 100_000
) -> AlignmentMap:
    """Fit the ``source`` -> ``target`` map on the users both versions hold, and store it."""
    x, y = shared_embeddings(client, source, target, max_users=max_users)
    mapping = fit(x, y, kind, source_version=source, target_version=target)
    Registry(client).set_alignment(source, target, mapping.to_fields())
    return mapping
