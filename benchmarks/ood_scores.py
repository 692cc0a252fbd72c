"""Which OOD score for the adapter heads, chosen on a validation set that is not the OOD test.

For each encoder seed, a version is trained exactly as ``downstream_adapters/scripts/
export_embeddings.py`` trains it (same seed, same OOD test users: bots, shuffled histories, Ciao
reviewers), and every candidate score is fitted on the training folds' real MovieLens users
(gender labels, the harness's 5 folds). The candidates are scored against two kinds of outliers:

* **validation** (what the choice is made on): corruptions of the *held-out fold's real users*
  that are neither the bot nor the shuffled generator: ``swapped`` (each event's item replaced
  by the item of a random real event, so the popularity of the items stays a real user's while
  the coherence of the taste goes), ``narrowed`` (every event's item drawn from three of the
  user's own items: a repetitive history) and ``blended`` (the normalised mean of two held-out
  users' embeddings, with the real users' norm: a point between two real users);
* **test**: the bot, shuffled and Ciao users of the export (reported, never used to choose).

The rule, fixed before any test figure: the candidate with the highest mean validation AUROC
over the three corruptions and every seed, among those that also flag a far synthetic cluster
(the heads' unit-test property, column ``far``: AUROC >= 0.95 for points scaled by 3 and
shifted by 6; added after a first validation run, before any test figure). ``--stage
validation`` computes only the validation table, so the choice can be recorded before the test
table exists. ``--positives all`` makes the corruptions of every user the validation positives,
as the test cases are built from every user (most of them in the training folds).

The rule picks the minor-axes Mahalanobis score, which then scored worse than the old default on
every test case and seed. The heads' default became the Euclidean kNN distance with k = 5
instead, a choice made *after* seeing this script's test figures (``docs/evaluation.md``, OOD
section, says how far that can be trusted); its row here is the implementation in
``heads/ood.py``.

    python benchmarks/ood_scores.py [--movielens DIR] [--ciao DIR] [--seeds 0 1 2 3 4] \\
        [--stage validation|test] [--positives held-out|all] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "downstream_adapters" / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from downstream_adapters.evaluate.harness import Task, folds  # noqa: E402
from downstream_adapters.heads import ood  # noqa: E402
from sklearn.covariance import OAS, LedoitWolf, ShrunkCovariance  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402
from sklearn.model_selection import KFold  # noqa: E402

from encoder_service.data.movielens import load_movielens  # noqa: E402
from encoder_service.data.tables import Dataset  # noqa: E402
from encoder_service.encoder import Encoder  # noqa: E402
from encoder_service.training.pipeline import train_version  # noqa: E402
from encoder_service.training.train import TrainConfig  # noqa: E402

TARGET = 0.9
TARGET_CASES = ("bot", "shuffled")
VALIDATION_CASES = ("swapped", "narrowed", "blended")
NARROW_ITEMS = 3
FAR_CLUSTER_FLOOR = 0.95
SHRINKAGE_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 0.6)
GMM_COMPONENTS = (1, 2, 3, 4, 6, 8)
Scorer = Callable[[np.ndarray], np.ndarray]


def _export_module() -> ModuleType:
    """The export script, so the version and its OOD test users are the very ones it exports."""
    path = REPO / "downstream_adapters" / "scripts" / "export_embeddings.py"
    spec = importlib.util.spec_from_file_location("export_embeddings", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_dir(arg: Path | None, name: str) -> Path:
    if arg:
        return arg
    return Path(os.environ.get("ENCODER_DATA_DIR", REPO.parent / "shared" / "data")) / name


# --- validation outliers: corruptions of real users, not the bot or shuffled generator --------


def swapped(dataset: Dataset, rng: np.random.Generator, export: ModuleType) -> Dataset:
    """Every event's item replaced by the item of a random real event (popularity kept)."""
    events = dataset.events[["user_id", "timestamp", "weight"]].copy()
    pool = dataset.events["item_id"].to_numpy()
    events["item_id"] = pool[rng.integers(0, len(pool), len(events))]
    return _renamed(dataset, events, "swapped", export)


def narrowed(dataset: Dataset, rng: np.random.Generator, export: ModuleType) -> Dataset:
    """Every event's item drawn from three of the user's own items: a repetitive history."""
    frames = []
    for _, group in dataset.events.groupby("user_id", sort=False):
        own = rng.choice(group["item_id"].unique(), NARROW_ITEMS, replace=False)
        frames.append(group.assign(item_id=rng.choice(own, len(group))))
    events = pd.concat(frames)[["user_id", "item_id", "timestamp", "weight"]]
    return _renamed(dataset, events, "narrowed", export)


def _renamed(dataset: Dataset, events: pd.DataFrame, case: str, export: ModuleType) -> Dataset:
    events = events.assign(user_id=f"{case}-" + events["user_id"].astype(str))
    users = dataset.users.assign(user_id=f"{case}-" + dataset.users["user_id"].astype(str))
    return export._dataset(dataset, events, users, dataset.items, case)


def blended(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mean of each row and a random other row, rescaled to the mean norm of the rows."""
    partner = (np.arange(len(x)) + rng.integers(1, len(x), len(x))) % len(x)
    mixed = x + x[partner]
    norm = np.linalg.norm(x, axis=1).mean()
    return mixed / np.linalg.norm(mixed, axis=1, keepdims=True) * norm


# --- candidate scores: fit(raw training embeddings, class indices) -> score(raw points) ------


def standardised(fit: Callable[[np.ndarray, np.ndarray], Scorer]) -> Callable[..., Scorer]:
    """Fit and score on embeddings standardised by the training rows, as the heads do."""

    def wrapped(raw: np.ndarray, y: np.ndarray) -> Scorer:
        shift, scale = raw.mean(axis=0), raw.std(axis=0) + 1e-6
        inner = fit((raw - shift) / scale, y)
        return lambda q: inner((q - shift) / scale)

    return wrapped


def _class_means(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([z[y == c].mean(axis=0) for c in np.unique(y)])


def _nearest_mean(means: np.ndarray, precision: np.ndarray) -> Scorer:
    def score(q: np.ndarray) -> np.ndarray:
        diff = q[:, None, :] - means[None]
        return np.einsum("ncd,de,nce->nc", diff, precision, diff).min(axis=1)

    return score


def maha_current(z: np.ndarray, y: np.ndarray) -> Scorer:
    return ood.MahalanobisScorer.fit(z, y, int(y.max()) + 1).score


def maha_estimator(make: Callable[[], Any]) -> Callable[[np.ndarray, np.ndarray], Scorer]:
    def fit(z: np.ndarray, y: np.ndarray) -> Scorer:
        means = _class_means(z, y)
        return _nearest_mean(means, make().fit(z - means[y]).precision_)

    return fit


def _shrunk(s: float) -> Callable[[], Any]:
    return lambda: ShrunkCovariance(shrinkage=s, assume_centered=True)


def maha_heldout(z: np.ndarray, y: np.ndarray) -> Scorer:
    """Shrinkage (grid, Ledoit-Wolf or OAS) by the Gaussian likelihood of held-out real users."""
    makers: dict[str, Callable[[], Any]] = {f"{s}": _shrunk(s) for s in SHRINKAGE_GRID}
    makers["lw"] = lambda: LedoitWolf(assume_centered=True)
    makers["oas"] = lambda: OAS(assume_centered=True)
    likelihood = dict.fromkeys(makers, 0.0)
    for inner_train, inner_test in KFold(3, shuffle=True, random_state=0).split(z):
        means = _class_means(z[inner_train], y[inner_train])
        held = z[inner_test] - means[y[inner_test]]
        for name, make in makers.items():
            estimator = make().fit(z[inner_train] - means[y[inner_train]])
            likelihood[name] += estimator.score(held)
    best = max(likelihood, key=lambda name: likelihood[name])
    CHOICES.setdefault("shrinkage", []).append(best)
    return maha_estimator(makers[best])(z, y)


def maha_background(z: np.ndarray, y: np.ndarray) -> Scorer:
    """One Gaussian over every training user, labels ignored (10 % shrinkage)."""
    return ood.MahalanobisScorer.fit(z, np.zeros(len(z), dtype=int), 1).score


def maha_relative(z: np.ndarray, y: np.ndarray) -> Scorer:
    """Ren et al. (2021): class-conditional distance minus the background Gaussian's."""
    conditional, background = maha_current(z, y), maha_background(z, y)
    return lambda q: conditional(q) - background(q)


def _minor_basis(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means, and the principal axes (with variances) beyond 90 % of the variance."""
    means = _class_means(z, y)
    _, s, vt = np.linalg.svd(z - means[y], full_matrices=False)
    variance = s**2 / (len(z) - 1)
    top = int(np.searchsorted(np.cumsum(variance) / variance.sum(), 0.9)) + 1
    CHOICES.setdefault("major axes", []).append(top)
    return means, vt[top:], variance[top:]


def maha_minor(z: np.ndarray, y: np.ndarray) -> Scorer:
    """Mahalanobis on the low-variance principal axes left after 90 % of the variance."""
    means, axes, variance = _minor_basis(z, y)
    return lambda q: ((((q[:, None, :] - means[None]) @ axes.T) ** 2) / variance).sum(-1).min(1)


def pca_residual(z: np.ndarray, y: np.ndarray) -> Scorer:
    """Squared norm of what the top principal axes (90 % of the variance) leave unexplained."""
    means, axes, _ = _minor_basis(z, y)
    return lambda q: (((q[:, None, :] - means[None]) @ axes.T) ** 2).sum(-1).min(1)


def knn(k: int) -> Callable[[np.ndarray, np.ndarray], Scorer]:
    """Sun et al. (2022): cosine distance to the k-th nearest L2-normalised training point."""

    def fit(z: np.ndarray, y: np.ndarray) -> Scorer:
        bank = _unit(z)
        return lambda q: 1.0 - np.sort(_unit(q) @ bank.T, axis=1)[:, -k]

    return fit


def knn_euclidean(k: int) -> Callable[[np.ndarray, np.ndarray], Scorer]:
    """Distance to the k-th nearest training point, lengths kept (no normalisation)."""

    def fit(z: np.ndarray, y: np.ndarray) -> Scorer:
        def score(q: np.ndarray) -> np.ndarray:
            squared = (q**2).sum(1)[:, None] - 2 * q @ z.T + (z**2).sum(1)[None]
            return np.sqrt(np.maximum(np.sort(squared, axis=1)[:, k - 1], 0.0))

        return score

    return fit


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gmm_bic(z: np.ndarray, y: np.ndarray) -> Scorer:
    """Negative log-likelihood under the Gaussian mixture (size, covariance type) of least BIC."""
    fits = [
        GaussianMixture(n, covariance_type=kind, reg_covar=1e-2, random_state=0).fit(z)
        for kind in ("full", "diag")
        for n in GMM_COMPONENTS
    ]
    best = min(fits, key=lambda model: model.bic(z))
    CHOICES.setdefault("gmm", []).append(f"{best.n_components} {best.covariance_type}")
    return lambda q: -best.score_samples(q)


CHOICES: dict[str, list[Any]] = {}
"""What the principled inner choices picked, per fold (reported, so they can be checked)."""
CANDIDATES: dict[str, Callable[[np.ndarray, np.ndarray], Scorer]] = {
    "Mahalanobis, 10 % shrinkage (current)": standardised(maha_current),
    "Mahalanobis, Ledoit-Wolf": standardised(
        maha_estimator(lambda: LedoitWolf(assume_centered=True))
    ),
    "Mahalanobis, OAS": standardised(maha_estimator(lambda: OAS(assume_centered=True))),
    "Mahalanobis, shrinkage by held-out likelihood": standardised(maha_heldout),
    "Mahalanobis, one Gaussian (no labels)": standardised(maha_background),
    "relative Mahalanobis": standardised(maha_relative),
    "Mahalanobis on minor axes (beyond 90 %)": standardised(maha_minor),
    "PCA residual (beyond 90 %)": standardised(pca_residual),
    "GMM negative log-likelihood (BIC)": standardised(gmm_bic),
    "kNN cosine, k=1 (rule)": knn(1),
    "kNN cosine, k=5": knn(5),
    "kNN cosine, k=20": knn(20),
    "kNN cosine on standardised, k=1": standardised(knn(1)),
    "kNN Euclidean on standardised, k=1": standardised(knn_euclidean(1)),
    "kNN Euclidean on standardised, k=5": standardised(knn_euclidean(5)),
    "kNN as in heads/ood.py (the heads' default)": standardised(
        lambda z, y: ood.KNNScorer.fit(z).score
    ),
}


def far_cluster_auroc(fit: Callable[[np.ndarray, np.ndarray], Scorer]) -> float:
    """The heads' unit-test property a product default must have: held-out points of three
    Gaussian classes (16 dims) against the same points scaled by 3 and shifted by 6."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 1.2
    y = rng.choice(3, size=900, p=[0.5, 0.25, 0.25])
    x = centres[y] + rng.normal(size=(900, 16))
    scorer = fit(x[:600], y[:600])
    inside, far = scorer(x[750:]), scorer(x[750:] * 3 + 6)
    return float(roc_auc_score(np.r_[np.zeros(150), np.ones(150)], np.r_[inside, far]))


# --- one encoder seed ---------------------------------------------------------------------------


def encode_seed(seed: int, movielens: Path, ciao: Path | None, stage: str) -> dict[str, Any]:
    """Real users' embeddings and gender, validation corruptions, and (stage test) the OOD test
    users, all encoded by one version trained as the export script trains it."""
    export = _export_module()
    dataset = load_movielens(movielens)
    rng = np.random.default_rng(seed)
    # The same draws, in the same order, as the export script makes for this seed.
    test = {"bot": export.bot_users(dataset, rng), "shuffled": export.shuffled_users(dataset, rng)}
    if ciao is not None:
        test["ciao"] = export.ciao_users(dataset, ciao, rng)
    corrupt = np.random.default_rng(10_000 + seed)
    validation = {"swapped": swapped(dataset, corrupt, export)}
    validation["narrowed"] = narrowed(dataset, corrupt, export)
    with tempfile.TemporaryDirectory() as folder:
        trained = train_version(
            dataset,
            version="ml-eval",
            out_dir=Path(folder),
            config=TrainConfig(
                embedding_dim=64,
                epochs=100,
                seed=seed,
                item_weight=export.ITEM_SET_WEIGHT,
                item_set_target=export.ITEM_SET_TARGET,
                max_branch_width=export.MAX_BRANCH_WIDTH,
                ensemble_size=export.ENSEMBLE_SIZE,
            ),
            item_vector_dim=export.ITEM_VECTOR_DIM,
            popularity_bins=export.POPULARITY_BINS,
            exclude_profile=export.LABEL_FIELDS,
            progress=False,
        )
        encoder = Encoder(trained.artifacts())
    users = [str(u) for u in trained.user_ids]
    profiles = dataset.users.set_index(dataset.users["user_id"].astype(str))
    out: dict[str, Any] = {
        "x": encoder.encode_features(trained.features).astype(np.float32),
        "gender": profiles.loc[users, "gender"].astype(str).to_numpy(),
        "validation": {},
        "test": {},
    }
    for case, corrupted in validation.items():
        # Row i of a corruption is the corrupted history of real user i.
        rows = {u: i for i, u in enumerate(corrupted.users["user_id"].astype(str))}
        order = [rows[f"{case}-{u}"] for u in users]
        out["validation"][case] = export.encode(encoder, corrupted)[order]
    if stage == "test":
        out["test"] = {case: export.encode(encoder, d) for case, d in test.items()}
    return out


def score_seed(
    data: dict[str, Any], n_folds: int, positives: str
) -> dict[str, dict[str, list[float]]]:
    """``{candidate: {case: [AUROC per fold]}}``. A validation corruption's positives are the
    corrupted histories of the fold's held-out users (``held-out``) or of every user (``all``:
    as the test cases are built, most of them from users the scorer was fitted on); a test
    case's positives are all its users."""
    x, task = data["x"], Task("gender", data["gender"])
    index = np.unique(task.y, return_inverse=True)[1]
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, list[float]]] = {}
    for train, held in folds(task, n_folds, 0):
        rows = held if positives == "held-out" else np.arange(len(x))
        outliers = {case: points[rows] for case, points in data["validation"].items()}
        outliers["blended"] = blended(x[rows], rng).astype(np.float32)
        outliers.update(data["test"])
        for name, fit in CANDIDATES.items():
            scorer = fit(x[train].astype(np.float64), index[train])
            inside = scorer(x[held].astype(np.float64))
            for case, points in outliers.items():
                scores = np.r_[inside, scorer(points.astype(np.float64))]
                truth = np.r_[np.zeros(len(inside)), np.ones(len(points))]
                auroc = float(roc_auc_score(truth, scores))
                out.setdefault(name, {}).setdefault(case, []).append(auroc)
    return out


# --- report ------------------------------------------------------------------------------------


def summarise(per_seed: dict[int, dict[str, dict[str, list[float]]]]) -> dict[str, Any]:
    """Per candidate and case: AUROC per seed (mean over folds), the mean over seeds, the
    target it is held against and whether it held, and the validation mean the choice uses."""
    rows: dict[str, Any] = {}
    for name in CANDIDATES:
        cases = per_seed[next(iter(per_seed))][name]
        row: dict[str, Any] = {}
        for case in cases:
            by_seed = {s: float(np.mean(per_seed[s][name][case])) for s in per_seed}
            mean = float(np.mean(list(by_seed.values())))
            target = TARGET if case in TARGET_CASES else None
            row[case] = {
                "auroc": mean,
                "by_seed": by_seed,
                "target": target,
                "held": None if target is None else mean >= target,
                "held_every_seed": None
                if target is None
                else all(v >= target for v in by_seed.values()),
            }
        row["validation_mean"] = float(np.mean([row[c]["auroc"] for c in VALIDATION_CASES]))
        row["far_cluster"] = far_cluster_auroc(CANDIDATES[name])
        rows[name] = row
    return rows


def print_table(rows: dict[str, Any], seeds: list[int]) -> None:
    cases = [c for c in next(iter(rows.values())) if c not in ("validation_mean", "far_cluster")]
    print(f"\nOOD AUROC, gender-fitted scores, mean over encoder seeds {seeds} (5 folds each)")
    print(f"{'score':<48}" + "".join(f"{c:>10}" for c in (*cases, "val mean", "far")))
    for name, row in rows.items():
        cells = "".join(f"{row[c]['auroc']:>10.3f}" for c in cases)
        print(f"{name:<48}{cells}{row['validation_mean']:>10.3f}{row['far_cluster']:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--movielens", type=Path, help="default: $ENCODER_DATA_DIR/movielens-100k")
    parser.add_argument("--ciao", type=Path, help="default: $ENCODER_DATA_DIR/ciao")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--stage", choices=("validation", "test"), default="test")
    parser.add_argument(
        "--positives",
        choices=("held-out", "all"),
        default="held-out",
        help="which users' corruptions are the validation positives",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    movielens, ciao = _data_dir(args.movielens, "movielens-100k"), _data_dir(args.ciao, "ciao")
    started = time.perf_counter()
    per_seed = {}
    for seed in args.seeds:
        data = encode_seed(seed, movielens, ciao if ciao.exists() else None, args.stage)
        per_seed[seed] = score_seed(data, args.folds, args.positives)
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    rows = summarise(per_seed)
    print_table(rows, args.seeds)
    eligible = [name for name in rows if rows[name]["far_cluster"] >= FAR_CLUSTER_FLOOR]
    chosen = max(eligible, key=lambda name: rows[name]["validation_mean"])
    print(f"\nchosen by the validation rule: {chosen}")
    for what, picked in CHOICES.items():
        print(f"inner choices, {what}: {sorted(set(map(str, picked)))}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "stage": args.stage,
            "seeds": args.seeds,
            "folds": args.folds,
            "validation_cases": list(VALIDATION_CASES),
            "validation_positives": args.positives,
            "rule": "highest mean validation AUROC over the corruptions and seeds, among the "
            f"scores with a far-cluster AUROC >= {FAR_CLUSTER_FLOOR}",
            "chosen": chosen,
            "inner_choices": {k: [str(v) for v in vs] for k, vs in CHOICES.items()},
            "rows": rows,
            "seconds": time.perf_counter() - started,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
