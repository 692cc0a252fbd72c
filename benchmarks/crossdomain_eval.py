"""Entire-space transfer on Ciao: the cross-domain adapter against the usual ways to use a source.

Task, per target category: will a user give this target-domain item the top rating (5 of 5)?
Every rating is one (user, item) sample. Time-based split at ``--cutoff``: the encoder, the item
catalogue, the graph and every model see only ratings before it; the test set is every rating of
the target category after it by a user the encoder knows (one who rated before the cut-off: the
published version has no embedding for anyone else).

* User side: the project's encoder is trained on the entire space before the cut-off. A training
  sample gets the embedding of the user's feature state just *before* that rating (replayed with
  ``FeatureState.apply``, the refresher's code), so its own rating never leaks into its input; a
  test sample gets the state at the cut-off (what the published version serves).
* Item side, also as of just before the rating (test: as of the cut-off): log count of earlier
  ratings, smoothed mean rating and share of 5s, a no-history flag, and the item vector of the
  encoder's catalogue (unknown items get their category's mean vector).
* Graph: user-item edges of every training rating plus Ciao's trust network (user-user).

Rows: target-only; naive merge (target + every source sample); fine-tuning the entire-space
model on the target; distillation with a fixed weight, coarse-only and fine-only ablations of the
full adapter at the a-priori settings (keep fraction 0.5, lambda 1); that full adapter; and the
full adapter choosing its keep fraction and lambda on the validation split (the default). Every
model early-stops on the latest 20 % of the target's training ratings, and the choice looks at
the same split; the test period is never looked at before the final scoring.

Per target, the paired difference full adapter minus naive merge (and minus target-only) per
seed, and a paired bootstrap over test ratings of the seed-mean AUC difference (95 % interval).

    python benchmarks/crossdomain_eval.py [--data-dir DIR] [--seeds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))
if importlib.util.find_spec("downstream_adapters") is None:
    sys.path.insert(0, str(REPO / "downstream_adapters" / "src"))

import torch  # noqa: E402
from downstream_adapters.crossdomain import (  # noqa: E402
    BinaryMLP,
    CrossDomainAdapter,
    DomainSamples,
    InteractionGraph,
)
from scipy.stats import rankdata  # noqa: E402
from sklearn.metrics import log_loss, roc_auc_score  # noqa: E402

from encoder_service.data.ciao import load_ciao, load_trust_edges  # noqa: E402
from encoder_service.data.contract import Event  # noqa: E402
from encoder_service.data.tables import Dataset  # noqa: E402
from encoder_service.encoder import Encoder  # noqa: E402
from encoder_service.features.state import FeatureState  # noqa: E402
from encoder_service.settings import get_settings  # noqa: E402

if TYPE_CHECKING:
    from encoder_service.training.train import ItemSetTarget

DEFAULT_TARGETS = ("Cameras", "Electronics", "Health")
TOP_RATING = 5.0
PRIOR_STRENGTH = 5.0
A_PRIORI = {"keep_fraction": 0.5, "strength": 1.0}
ROWS = (
    "target-only",
    "naive merge",
    "fine-tune entire-space model",
    "distillation, fixed weight",
    "coarse-only (graph selection)",
    "fine-only (domain weights)",
    "full adapter, a-priori settings",
    "full adapter",
)
PAIRED = ("naive merge", "target-only")  # the full adapter's paired differences against these
BOOTSTRAP = 1000


def _data_dir(arg: Path | None) -> Path:
    if arg:
        return arg
    root = Path(os.environ.get("ENCODER_DATA_DIR", REPO.parent / "shared" / "data"))
    return root / "ciao"


@dataclass
class Prepared:
    """Every rating as a sample: features, label, graph node ids, category, split."""

    x: np.ndarray
    y: np.ndarray
    users: np.ndarray
    items: np.ndarray
    category: np.ndarray
    train: np.ndarray  # bool
    graph: InteractionGraph
    embedding_dim: int

    def save(self, path: Path) -> None:
        g = self.graph
        np.savez(
            path,
            **{k: getattr(self, k) for k in ("x", "y", "users", "items", "category", "train")},
            graph=np.array([g.n_users, g.n_items]),
            src=g.src,
            dst=g.dst,
            weight=g.weight,
            embedding_dim=self.embedding_dim,
        )

    @classmethod
    def load(cls, path: Path) -> Prepared:
        with np.load(path, allow_pickle=False) as d:
            n_users, n_items = (int(v) for v in d["graph"])
            graph = InteractionGraph(n_users, n_items, d["src"], d["dst"], d["weight"])
            arrays = {k: d[k] for k in ("x", "y", "users", "items", "category", "train")}
            return cls(**arrays, graph=graph, embedding_dim=int(d["embedding_dim"]))


def prepare(
    data_dir: Path,
    cutoff: float,
    epochs: int,
    seed: int,
    *,
    item_vector_dim: int,
    item_set_weight: float,
    item_set_target: ItemSetTarget,
    max_branch_width: int,
    ensemble_size: int,
) -> Prepared:
    """Train the encoder before the cut-off and build every sample's features.

    The command line's encoder settings default to the service's (``ENCODER_ITEM_VECTOR_DIM``,
    ``ENCODER_ITEM_SET_WEIGHT``, ``ENCODER_ITEM_SET_TARGET``, ``ENCODER_MAX_BRANCH_WIDTH``,
    ``ENCODER_ENSEMBLE_SIZE``), so the table measures what a deployment trains by default.
    """
    from encoder_service.training.pipeline import train_version
    from encoder_service.training.train import TrainConfig

    data = load_ciao(data_dir)
    events = data.events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    items = zip(data.items["item_id"], data.items["categories"], strict=True)
    primary = {str(i): c[0] for i, c in items}
    before = events[events["timestamp"] < cutoff]
    train_items = data.items[data.items["item_id"].isin(set(before["item_id"]))]
    users = pd.DataFrame({"user_id": sorted(before["user_id"].unique())})
    train_set = Dataset(
        events=before.reset_index(drop=True),
        users=users,
        items=train_items.reset_index(drop=True),
        name="ciao-before-cutoff",
    )
    with tempfile.TemporaryDirectory() as folder:
        trained = train_version(
            train_set,
            version="ciao-cut",
            out_dir=Path(folder),
            config=TrainConfig(
                embedding_dim=64,
                epochs=epochs,
                seed=seed,
                item_weight=item_set_weight,
                item_set_target=item_set_target,
                max_branch_width=max_branch_width,
                ensemble_size=ensemble_size,
            ),
            item_vector_dim=item_vector_dim,
            progress=False,
        )
        encoder = Encoder(trained.artifacts())
    user_rows = _user_rows(events, cutoff, encoder)
    embeddings = encoder.encode_features(user_rows)
    item_x = _item_features(events, cutoff, encoder, primary)
    user_index = pd.Index(sorted(events["user_id"].unique()))
    item_index = pd.Index(sorted(events["item_id"].unique()))
    u = user_index.get_indexer(events["user_id"])
    i = item_index.get_indexer(events["item_id"])
    train = (events["timestamp"] < cutoff).to_numpy()
    trust = load_trust_edges(data_dir)
    a = user_index.get_indexer(trust["truster"])
    b = user_index.get_indexer(trust["trustee"])
    known = (a >= 0) & (b >= 0)
    graph = InteractionGraph.from_interactions(
        u[train], i[train], len(user_index), len(item_index), social=(a[known], b[known])
    )
    order = np.argsort(events["timestamp"].to_numpy(), kind="stable")  # time order
    x = np.concatenate([embeddings, item_x], axis=1).astype(np.float32)
    return Prepared(
        x=x[order],
        y=(events["weight"].to_numpy() >= TOP_RATING).astype(np.float32)[order],
        users=u[order],
        items=i[order],
        category=np.array([primary[str(t)] for t in events["item_id"]])[order],
        train=train[order],
        graph=graph,
        embedding_dim=embeddings.shape[1],
    )


def _user_rows(events: pd.DataFrame, cutoff: float, encoder: Encoder) -> np.ndarray:
    """The encoder input of every rating's user, as of just before it (test: at the cut-off).

    ``events`` is sorted by (user, time); ratings of the same day see the same state.
    """
    catalogs = {encoder.catalog_id: encoder.catalog}
    rows = np.zeros((len(events), encoder.vectorize.input_dim), dtype=np.float32)
    user = events["user_id"].to_numpy()
    item = events["item_id"].to_numpy()
    stamp = events["timestamp"].to_numpy()
    weight = events["weight"].to_numpy()
    state, current_user, current_row, last_time = FeatureState(), None, None, None
    for k in range(len(events)):
        if user[k] != current_user:
            state, current_user, last_time = FeatureState(), user[k], None
        t = min(stamp[k], cutoff)  # test ratings see the cut-off snapshot
        if t != last_time:
            current_row, last_time = encoder.vectorize([state])[0], t
        rows[k] = current_row
        if stamp[k] < cutoff:
            state.apply(
                Event(user_id=user[k], item_id=item[k], timestamp=stamp[k], weight=weight[k]),
                catalogs,
            )
    return rows


def _item_features(
    events: pd.DataFrame, cutoff: float, encoder: Encoder, primary: dict[str, str]
) -> np.ndarray:
    """Item statistics from the ratings strictly before each rating (capped at the cut-off)."""
    frame = pd.DataFrame(
        {
            "item": events["item_id"].to_numpy(),
            "t": np.minimum(events["timestamp"].to_numpy(), cutoff),
            "seen": (events["timestamp"] < cutoff).to_numpy().astype(float),
        }
    )
    frame["r"] = events["weight"].to_numpy() * frame["seen"]
    frame["top"] = (events["weight"].to_numpy() >= TOP_RATING) * frame["seen"]
    groups = frame.groupby(["item", "t"], sort=True)[["seen", "r", "top"]].sum()
    prior = groups.groupby(level="item").cumsum() - groups  # strictly earlier days
    prior = prior.reindex(pd.MultiIndex.from_frame(frame[["item", "t"]])).to_numpy()
    n, total, top = prior[:, 0], prior[:, 1], prior[:, 2]
    seen = frame["seen"].to_numpy() > 0
    mean_rating = events["weight"].to_numpy()[seen].mean()
    top_share = (events["weight"].to_numpy()[seen] >= TOP_RATING).mean()
    vectors = np.stack(
        [encoder.catalog.lookup(str(i), (primary[str(i)],))[1] for i in frame["item"]]
    )
    stats = np.stack(
        [
            np.log1p(n),
            (total + PRIOR_STRENGTH * mean_rating) / (n + PRIOR_STRENGTH),
            (top + PRIOR_STRENGTH * top_share) / (n + PRIOR_STRENGTH),
            (n == 0).astype(float),
        ],
        axis=1,
    )
    return np.concatenate([stats, vectors], axis=1)


def _samples(p: Prepared, rows: np.ndarray) -> DomainSamples:
    return DomainSamples(p.x[rows], p.y[rows], p.users[rows], p.items[rows])


def _scores(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    prob = np.clip(prob, 1e-6, 1 - 1e-6)
    return {"auc": float(roc_auc_score(y, prob)), "log_loss": float(log_loss(y, prob))}


def run_target(
    p: Prepared,
    category: str,
    teacher: BinaryMLP,
    seed: int,
    network: dict[str, object],
    choice: dict[str, object],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every row of the table for one target category and one seed, and the test predictions.

    ``choice`` is the full adapter's ``keep_fraction`` and ``strength`` (``"auto"`` or a value).
    """
    target_train = np.flatnonzero(p.train & (p.category == category))
    # the published version knows only users who rated before the cut-off; the service answers
    # 404 for the others, so they are no test case for a model on the embedding
    known = np.isin(p.users, p.users[p.train])
    test = np.flatnonzero(~p.train & known & (p.category == category))
    source_rows = np.flatnonzero(p.train & (p.category != category))
    target, source = _samples(p, target_train), _samples(p, source_rows)
    nothing = _samples(p, source_rows[:0])
    # The embedding and item statistics, never anything that names the domain.
    shared: dict[str, object] = {"seed": seed, **network}
    out: dict[str, Any] = {}
    predictions: dict[str, np.ndarray] = {}

    def score(name: str, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        predictions[name] = predict(p.x[test])
        out[name] = _scores(p.y[test], predictions[name])

    plain = {"coarse": False, "fine": False, "distill": "none", "keep_fraction": 1.0}
    score("target-only", CrossDomainAdapter(**plain, **shared).fit(target, nothing).predict_proba)
    score("naive merge", CrossDomainAdapter(**plain, **shared).fit(target, source).predict_proba)
    train, validation = CrossDomainAdapter(**shared).split(target)
    tuned = copy.deepcopy(teacher)
    tuned.config["lr"] = float(tuned.config["lr"]) / 4
    tuned.fit(train.x, train.y, validation=(validation.x, validation.y), warm_start=True)
    score("fine-tune entire-space model", tuned.predict_proba)
    variants = {
        "distillation, fixed weight": {"distill": "fixed", **A_PRIORI},
        "coarse-only (graph selection)": {"fine": False, **A_PRIORI},
        "fine-only (domain weights)": {"coarse": False, **A_PRIORI, "keep_fraction": 1.0},
        "full adapter": choice,
    }
    for name, options in variants.items():
        adapter = CrossDomainAdapter(**options, **shared).fit(  # type: ignore[arg-type]
            target, source, graph=p.graph, teacher=teacher
        )
        score(name, adapter.predict_proba)
        assert adapter.selection is not None
        out[name].update({f"selection_{k}": v for k, v in adapter.selection.stats.items()})
        out[name].update({f"chosen_{k}": v for k, v in adapter.chosen.items()})
    # every candidate the full adapter tried, scored on the test period only for this report
    # (the choice saw validation losses alone); the a-priori one is a row of the table
    out["search"] = {}
    for candidate in adapter.search:
        key = _candidate_key(candidate.keep_fraction, candidate.strength, candidate.from_teacher)
        prob = candidate.student.predict_proba(p.x[test])
        out["search"][key] = {"val_loss": candidate.val_loss, **_scores(p.y[test], prob)}
        if candidate.from_teacher and (candidate.keep_fraction, candidate.strength) == tuple(
            A_PRIORI.values()
        ):
            predictions["full adapter, a-priori settings"] = prob
            out["full adapter, a-priori settings"] = {
                **_scores(p.y[test], prob),
                **{f"selection_{k}": v for k, v in candidate.selection.stats.items()},
            }
    if "full adapter, a-priori settings" not in out:
        a_priori = CrossDomainAdapter(**A_PRIORI, **shared).fit(  # type: ignore[arg-type]
            target, source, graph=p.graph, teacher=teacher
        )
        score("full adapter, a-priori settings", a_priori.predict_proba)
    out["counts"] = {
        "train": float(len(target_train)),
        "test": float(len(test)),
        "source": float(len(source_rows)),
        "test_positive_share": float(p.y[test].mean()),
    }
    predictions["label"] = p.y[test]
    return out, predictions


def _candidate_key(keep_fraction: float, strength: float, from_teacher: bool) -> str:
    if not from_teacher:
        return "target alone, fresh network"
    return f"keep {keep_fraction:g}, lambda {strength:g}"


def entire_space_teacher(p: Prepared, seed: int, network: dict[str, object]) -> BinaryMLP:
    """One model on every training rating, early-stopped on the latest 5 % of them."""
    rows = np.flatnonzero(p.train)
    n_val = len(rows) // 20
    fit, val = rows[:-n_val], rows[-n_val:]
    return BinaryMLP(seed=seed, **network).fit(  # type: ignore[arg-type]
        p.x[fit], p.y[fit], validation=(p.x[val], p.y[val])
    )


CONTINUAL_ROWS = ("period 1 only (stale)", "continual update", "retrained on both periods")


def _graph_of(p: Prepared, rows: np.ndarray) -> InteractionGraph:
    """The interaction graph of ``rows`` plus the (timeless) trust edges of ``p.graph``."""
    g = p.graph
    trust = (g.src < g.n_users) & (g.dst < g.n_users) & (g.src < g.dst)
    return InteractionGraph.from_interactions(
        p.users[rows], p.items[rows], g.n_users, g.n_items, social=(g.src[trust], g.dst[trust])
    )


def run_continual(
    p: Prepared, category: str, seed: int, network: dict[str, object], choice: dict[str, object]
) -> dict[str, dict[str, float]]:
    """Period 1 = the earliest 80 % of the training ratings, period 2 = the rest.

    The adapter fitted on period 1 is scored as it is (stale), after ``update`` with period 2
    (warm start), and against an adapter fitted from scratch on both periods. Each adapter
    trains its own teacher on the data it is given.
    """
    train = np.flatnonzero(p.train)
    cut = train[int(len(train) * 0.8)]  # rows are in time order
    period1 = p.train & (np.arange(len(p.y)) < cut)
    period2 = p.train & ~period1
    known = np.isin(p.users, p.users[p.train])
    test = np.flatnonzero(~p.train & known & (p.category == category))
    is_target = p.category == category

    def domain(mask: np.ndarray) -> tuple[DomainSamples, DomainSamples]:
        return _samples(p, np.flatnonzero(mask & is_target)), _samples(
            p, np.flatnonzero(mask & ~is_target)
        )

    settings: dict[str, object] = {"seed": seed, **choice, **network}
    out: dict[str, dict[str, float]] = {}
    started = time.time()
    adapter = CrossDomainAdapter(**settings).fit(  # type: ignore[arg-type]
        *domain(period1), graph=_graph_of(p, np.flatnonzero(period1))
    )
    out[CONTINUAL_ROWS[0]] = {**_scores(p.y[test], adapter.predict_proba(p.x[test]))}
    out[CONTINUAL_ROWS[0]]["seconds"] = time.time() - started
    started = time.time()
    adapter.update(*domain(period2), graph=_graph_of(p, np.flatnonzero(p.train)))
    out[CONTINUAL_ROWS[1]] = {**_scores(p.y[test], adapter.predict_proba(p.x[test]))}
    out[CONTINUAL_ROWS[1]]["seconds"] = time.time() - started
    started = time.time()
    scratch = CrossDomainAdapter(**settings).fit(  # type: ignore[arg-type]
        *domain(p.train), graph=p.graph
    )
    out[CONTINUAL_ROWS[2]] = {**_scores(p.y[test], scratch.predict_proba(p.x[test]))}
    out[CONTINUAL_ROWS[2]]["seconds"] = time.time() - started
    out["counts"] = {
        "period1_target": float((period1 & is_target).sum()),
        "period2_target": float((period2 & is_target).sum()),
        "test": float(len(test)),
    }
    return out


def summarise_continual(results: dict[str, list[dict[str, dict[str, float]]]]) -> dict[str, object]:
    """Mean ± std per row, and the check that updating beats the stale model."""
    summary: dict[str, object] = {}
    for category, runs in results.items():
        rows = {
            row: {
                f"{m}_{stat}": float(
                    getattr(np, stat)(
                        [r[row][m] for r in runs],
                        **({"ddof": 1} if stat == "std" and len(runs) > 1 else {}),
                    )
                )
                for m in ("auc", "log_loss", "seconds")
                for stat in ("mean", "std")
            }
            for row in CONTINUAL_ROWS
        }
        update, stale = rows[CONTINUAL_ROWS[1]], rows[CONTINUAL_ROWS[0]]
        checks = [
            {
                "figure": "continual update log-loss",
                "value": update["log_loss_mean"],
                "target": f"<= stale period-1 log-loss {stale['log_loss_mean']:.4f}",
                "held": bool(update["log_loss_mean"] <= stale["log_loss_mean"]),
            }
        ]
        summary[category] = {"rows": rows, "checks": checks, "counts": runs[0]["counts"]}
        print(f"\n{category} (continual): {runs[0]['counts']}")
        for row in CONTINUAL_ROWS:
            r = rows[row]
            print(
                f"  {row:28s} AUC {r['auc_mean']:.4f} ± {r['auc_std']:.4f}  log-loss "
                f"{r['log_loss_mean']:.4f} ± {r['log_loss_std']:.4f}  {r['seconds_mean']:.0f} s"
            )
        for check in checks:
            mark = "held" if check["held"] else "NOT held"
            print(f"  check: {check['figure']} {check['value']:.4f} {check['target']}: {mark}")
    return summary


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired(
    runs: list[dict[str, dict[str, float]]],
    predictions: list[dict[str, np.ndarray]],
    other: str,
    *,
    seed: int = 0,
) -> dict[str, object]:
    """Full adapter minus ``other``: AUC per seed (same seed, same initialisation), and a
    paired bootstrap over test ratings of the seed-mean difference.

    The bootstrap redraws the test ratings (the same draw for both models and every seed), so
    its interval is the sampling noise of the test set; the seed spread is the training noise.
    """
    diffs = np.array([r["full adapter"]["auc"] - r[other]["auc"] for r in runs])
    y = predictions[0]["label"]
    rng = np.random.default_rng(seed)
    boot = np.empty(BOOTSTRAP)
    for b in range(BOOTSTRAP):
        rows = rng.integers(0, len(y), len(y))
        while y[rows].min() == y[rows].max():  # an AUC needs both labels
            rows = rng.integers(0, len(y), len(y))
        boot[b] = np.mean(
            [
                _rank_auc(y[rows], pr["full adapter"][rows]) - _rank_auc(y[rows], pr[other][rows])
                for pr in predictions
            ]
        )
    low, high = np.quantile(boot, [0.025, 0.975])
    return {
        "per_seed": [float(d) for d in diffs],
        "mean": float(diffs.mean()),
        "std": _std(diffs),
        "min": float(diffs.min()),
        "max": float(diffs.max()),
        "bootstrap_95": [float(low), float(high)],
        "bootstrap_draws": BOOTSTRAP,
    }


def _rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties averaged): the same number as scikit-learn's,
    without its input checks, which dominate the bootstrap's thousands of calls."""
    ranks = rankdata(score)
    pos = y == 1
    n_pos = int(pos.sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))


def _search_summary(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per candidate: mean validation loss and test AUC over seeds, and how often it was chosen."""
    out: dict[str, dict[str, float]] = {}
    for key in runs[0]["search"]:
        chosen = [
            key
            == _candidate_key(
                r["full adapter"]["chosen_keep_fraction"],
                r["full adapter"]["chosen_strength"],
                r["full adapter"]["chosen_from_teacher"],
            )
            for r in runs
        ]
        out[key] = {
            "val_loss_mean": float(np.mean([r["search"][key]["val_loss"] for r in runs])),
            "test_auc_mean": float(np.mean([r["search"][key]["auc"] for r in runs])),
            "times_chosen": float(sum(chosen)),
        }
    return out


def summarise(
    results: dict[str, list[dict[str, dict[str, float]]]],
    predictions: dict[str, list[dict[str, np.ndarray]]],
) -> dict[str, object]:
    """Mean and std over seeds per target and row, paired differences, and the checks."""
    summary: dict[str, object] = {}
    for category, runs in results.items():
        rows: dict[str, dict[str, float]] = {}
        for row in ROWS:
            for metric in ("auc", "log_loss"):
                values = np.array([r[row][metric] for r in runs])
                rows.setdefault(row, {})[f"{metric}_mean"] = float(values.mean())
                rows[row][f"{metric}_std"] = _std(values)
        full = np.array([r["full adapter"]["auc"] for r in runs])
        only = np.array([r["target-only"]["auc"] for r in runs])
        naive = np.array([r["naive merge"]["auc"] for r in runs])
        noise = _std(only)
        differences = {other: paired(runs, predictions[category], other) for other in PAIRED}
        checks = [
            {
                "figure": "full adapter AUC",
                "value": float(full.mean()),
                "target": f"> target-only AUC {only.mean():.4f}",
                "held": bool(full.mean() > only.mean()),
            },
            {
                "figure": "full adapter AUC",
                "value": float(full.mean()),
                "target": f"> naive merge AUC {naive.mean():.4f}",
                "held": bool(full.mean() > naive.mean()),
            },
            {
                "figure": "worst seed: full adapter AUC - target-only AUC",
                "value": float((full - only).min()),
                "target": f">= -{noise:.4f} (target-only's seed std: the noise)",
                "held": bool((full - only).min() >= -noise),
            },
        ]
        keys = sorted({k for r in runs for k in r["full adapter"] if k.startswith("selection_")})
        selection = {
            k.removeprefix("selection_"): float(
                np.nanmean([r["full adapter"].get(k, np.nan) for r in runs])
            )
            for k in keys
        }
        chosen = [
            {
                k.removeprefix("chosen_"): v
                for k, v in r["full adapter"].items()
                if k.startswith("chosen_")
            }
            for r in runs
        ]
        figures = [
            {
                "figure": f"{row} {metric} (mean of {len(runs)} seeds)",
                "value": rows[row][f"{metric}_mean"],
                "std": rows[row][f"{metric}_std"],
                "target": "the full adapter's rows are checked below"
                if row == "full adapter"
                else "a reference row: no target of its own",
                "held": None,
            }
            for row in ROWS
            for metric in ("auc", "log_loss")
        ]
        figures += [
            {
                "figure": f"full adapter AUC - {other} AUC, paired by seed (mean of {len(runs)})",
                "value": d["mean"],
                "std": d["std"],
                "bootstrap_95": d["bootstrap_95"],
                "target": "> 0",
                "held": bool(d["mean"] > 0),  # type: ignore[operator]
            }
            for other, d in differences.items()
        ]
        summary[category] = {
            "figures": figures + checks,
            "rows": rows,
            "checks": checks,
            "paired_differences": differences,
            "counts": runs[0]["counts"],
            "full_adapter_selection": selection,
            "full_adapter_chosen": chosen,
            "full_adapter_candidates": _search_summary(runs),
        }
    return summary


def print_table(summary: dict[str, object], seeds: int) -> None:
    for category, body in summary.items():
        assert isinstance(body, dict)
        counts = body["counts"]
        print(
            f"\n{category}: {int(counts['train'])} training / {int(counts['test'])} test ratings "
            f"(top-rating share {counts['test_positive_share']:.2f}), "
            f"{int(counts['source'])} source; {seeds} seeds, mean ± std"
        )
        print(f"  {'row':34s} {'AUC':>16s} {'log-loss':>16s}")
        for row in ROWS:
            r = body["rows"][row]
            print(
                f"  {row:34s} {r['auc_mean']:.4f} ± {r['auc_std']:.4f}"
                f"  {r['log_loss_mean']:.4f} ± {r['log_loss_std']:.4f}"
            )
        for other, d in body["paired_differences"].items():
            seeds_text = " ".join(f"{v:+.4f}" for v in d["per_seed"])
            low, high = d["bootstrap_95"]
            print(
                f"  full adapter - {other}: per seed {seeds_text}; mean {d['mean']:+.4f} "
                f"± {d['std']:.4f}; test-set bootstrap 95 % [{low:+.4f}, {high:+.4f}]"
            )
        sel = body["full_adapter_selection"]
        print(
            f"  full adapter kept {sel['coarse_kept']:.0f} source samples after the graph, "
            f"{sel['fine_kept']:.0f} after the domain weights (effective "
            f"{sel['effective_source']:.0f}; domain classifier AUC "
            f"{sel.get('domain_auc', float('nan')):.3f}); mean over seeds"
        )
        picks = "; ".join(
            _candidate_key(c["keep_fraction"], c["strength"], c["from_teacher"])
            for c in body["full_adapter_chosen"]
        )
        print(f"  chosen per seed: {picks}")
        for key, c in body["full_adapter_candidates"].items():
            print(
                f"    candidate {key:29s} val log-loss {c['val_loss_mean']:.4f}  "
                f"test AUC {c['test_auc_mean']:.4f}  chosen {c['times_chosen']:.0f}x"
            )
        for check in body["checks"]:
            mark = "held" if check["held"] else "NOT held"
            print(f"  check: {check['figure']} {check['value']:.4f} {check['target']}: {mark}")


def _choice(value: str) -> float | str:
    """``auto`` or a number, for ``--keep-fraction`` and ``--strength``."""
    return value if value == "auto" else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="Ciao folder (default ENCODER_DATA_DIR/ciao)")
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--cutoff", default="2008-01-01", help="UTC date of the train/test split")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--encoder-epochs", type=int, default=30)
    settings = get_settings()
    parser.add_argument(
        "--item-vector-dim",
        type=int,
        default=settings.item_vector_dim,
        help="the encoder's item vector width (default: ENCODER_ITEM_VECTOR_DIM's)",
    )
    parser.add_argument(
        "--item-set-weight",
        type=float,
        default=settings.item_set_weight,
        help="item-set reconstruction weight (default: ENCODER_ITEM_SET_WEIGHT's)",
    )
    parser.add_argument(
        "--item-set-target",
        choices=["presence", "weight"],
        default=settings.item_set_target,
        help="what the item-set reconstruction predicts (default: ENCODER_ITEM_SET_TARGET's)",
    )
    parser.add_argument(
        "--max-branch-width",
        type=int,
        default=settings.max_branch_width,
        help="widest branch of the encoder's feature groups (default: ENCODER_MAX_BRANCH_WIDTH's)",
    )
    parser.add_argument(
        "--ensemble-size",
        type=int,
        default=settings.ensemble_size,
        help="autoencoders distilled into the encoder (default: ENCODER_ENSEMBLE_SIZE's)",
    )
    parser.add_argument("--max-steps", type=int, default=1500, help="step budget per network")
    parser.add_argument(
        "--keep-fraction",
        type=_choice,
        default="auto",
        help="the full adapter's keep fraction: a number, or auto (chosen on validation)",
    )
    parser.add_argument(
        "--strength",
        type=_choice,
        default="auto",
        help="the full adapter's distillation lambda: a number, or auto (chosen on validation)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--cache",
        type=Path,
        help="an .npz (outside the repository: it is derived from the data set) to keep the "
        "prepared features in; reused when it exists",
    )
    parser.add_argument(
        "--continual",
        action="store_true",
        help="instead of the main table: a period-1 adapter, stale vs updated with period 2 "
        "(warm start) vs retrained on both",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = _data_dir(args.data_dir)
    if not (data_dir / "ratings_with_timestamp.csv.gz").exists():
        parser.error(f"--data-dir: no Ciao ratings file in {data_dir}")
    cutoff = pd.Timestamp(args.cutoff, tz="UTC").timestamp()
    started = time.time()
    if args.cache and args.cache.exists():
        prepared = Prepared.load(args.cache)
    else:
        prepared = prepare(
            data_dir,
            cutoff,
            args.encoder_epochs,
            seed=0,
            item_vector_dim=args.item_vector_dim,
            item_set_weight=args.item_set_weight,
            item_set_target=args.item_set_target,
            max_branch_width=args.max_branch_width,
            ensemble_size=args.ensemble_size,
        )
        if args.cache:
            prepared.save(args.cache)
    print(f"features ready in {time.time() - started:.0f} s: {prepared.x.shape}", flush=True)
    network = {"max_steps": args.max_steps}
    choice = {"keep_fraction": args.keep_fraction, "strength": args.strength}
    results: dict[str, list[dict[str, dict[str, float]]]] = {c: [] for c in args.targets}
    if args.continual:
        for seed in range(args.seeds):
            for category in args.targets:
                run = run_continual(prepared, category, seed, network, choice)
                results[category].append(run)
                print(f"seed {seed} {category}: {run} ({time.time() - started:.0f} s)", flush=True)
        _write(args, summarise_continual(results), results)
        return
    predictions: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in args.targets}
    for seed in range(args.seeds):
        teacher = entire_space_teacher(prepared, seed, network)
        for category in args.targets:
            run, predicted = run_target(prepared, category, teacher, seed, network, choice)
            results[category].append(run)
            predictions[category].append(predicted)
            brief = {k: round(v["auc"], 4) for k, v in run.items() if "auc" in v}
            print(f"seed {seed} {category}: {brief} ({time.time() - started:.0f} s)", flush=True)
    summary = summarise(results, predictions)
    print_table(summary, args.seeds)
    _write(args, summary, results)


def _write(args: argparse.Namespace, summary: dict[str, object], results: object) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "config": {**vars(args), "json": str(args.json), "data_dir": None},
                    "summary": summary,
                    "runs": results,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
