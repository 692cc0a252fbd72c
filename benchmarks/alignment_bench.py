"""How much a downstream head trained on version A loses when it reads version B through an
alignment map, on MovieLens-100K.

Two versions, A and B, are trained on the same data with different seeds, with the label fields
(gender, age, occupation) left out of the encoder's profile input. Maps B -> A are fitted on all
users (as ``encoder-service versions align`` does: no labels involved). Heads (logistic
regression on standardised embeddings) are trained on A's embeddings of the training folds and
evaluated on the held-out fold, fed four inputs: true A, B mapped by orthogonal Procrustes, B
mapped by ridge, and B unaligned. Tasks: gender (ROC AUC), age bucket (<25, 25-34, 35-44, 45+;
accuracy), occupation (21 classes; accuracy). Figures are means over 5 stratified folds.

Example::

    python benchmarks/alignment_bench.py --json benchmarks/results/alignment.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from encoder_service.alignment import fit  # noqa: E402
from encoder_service.data.movielens import load_movielens  # noqa: E402
from encoder_service.encoder import Encoder  # noqa: E402
from encoder_service.training.pipeline import train_version  # noqa: E402
from encoder_service.training.train import TrainConfig  # noqa: E402

LABELS = ("gender", "age", "occupation")
AGE_EDGES = (25, 35, 45)
INPUTS = ("true A", "B aligned (Procrustes)", "B aligned (ridge)", "B unaligned")
TARGET_LOSS_POINTS = 1.0


def _embeddings(
    dataset, version: str, seed: int, dim: int, epochs: int, ensemble_size: int, out: Path
):
    trained = train_version(
        dataset,
        version=version,
        out_dir=out,
        config=TrainConfig(
            embedding_dim=dim, epochs=epochs, seed=seed, ensemble_size=ensemble_size
        ),
        exclude_profile=list(LABELS),
        parent_version="A" if version == "B" else None,
        progress=False,
    )
    return trained.user_ids, Encoder(trained.artifacts()).encode_features(trained.features)


def _tasks(dataset, user_ids: list[str]) -> dict[str, np.ndarray]:
    users = dataset.users.set_index("user_id").loc[user_ids]
    return {
        "gender AUC": (users["gender"].to_numpy() == "F").astype(int),
        "age-bucket accuracy": np.digitize(users["age"].to_numpy(), AGE_EDGES),
        "occupation accuracy": np.unique(users["occupation"].to_numpy(), return_inverse=True)[1],
    }


def _score(task: str, head, x: np.ndarray, y: np.ndarray) -> float:
    if task.startswith("gender"):
        return float(roc_auc_score(y, head.predict_proba(x)[:, 1]))
    return float(accuracy_score(y, head.predict(x)))


def evaluate(inputs: dict[str, np.ndarray], tasks: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per task and input, the mean held-out score of heads trained on true A."""
    results: dict[str, dict] = {}
    for task, y in tasks.items():
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        scores: dict[str, list[float]] = {name: [] for name in inputs}
        for train, test in folds.split(inputs["true A"], y):
            head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
            head.fit(inputs["true A"][train], y[train])
            for name, x in inputs.items():
                scores[name].append(_score(task, head, x[test], y[test]))
        means = {name: float(np.mean(s)) for name, s in scores.items()}
        results[task] = {
            "scores": means,
            "loss_points": {n: 100 * (means["true A"] - v) for n, v in means.items()},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--movielens",
        type=Path,
        default=Path(os.environ.get("ENCODER_DATA_DIR", "../shared/data")) / "movielens-100k",
        help="MovieLens-100K folder (default: $ENCODER_DATA_DIR/movielens-100k).",
    )
    parser.add_argument("--dim", type=int, default=64, help="Embedding size of both versions.")
    parser.add_argument("--epochs", type=int, default=40, help="Most training epochs.")
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 1), help="Seeds of A and B.")
    parser.add_argument(
        "--ensemble-size", type=int, default=1, help="Autoencoders distilled into each version."
    )
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args()

    started = time.perf_counter()
    dataset = load_movielens(args.movielens)
    with tempfile.TemporaryDirectory() as tmp:
        common = (args.dim, args.epochs, args.ensemble_size, Path(tmp))
        users_a, a = _embeddings(dataset, "A", args.seeds[0], *common)
        users_b, b = _embeddings(dataset, "B", args.seeds[1], *common)
    assert users_a == users_b, "both versions must embed the same users in the same order"
    procrustes = fit(b, a, "procrustes", source_version="B", target_version="A")
    ridge = fit(b, a, "ridge", source_version="B", target_version="A")
    inputs = dict(zip(INPUTS, (a, procrustes.apply(b), ridge.apply(b), b), strict=True))
    results = evaluate(inputs, _tasks(dataset, users_a))

    print(f"MovieLens-100K, {len(users_a)} users, dim {args.dim}, heads trained on true A")
    print(f"{'task':<22}" + "".join(f"{name:>25}" for name in INPUTS))
    for task, r in results.items():
        cells = "".join(f"{r['scores'][n]:>17.3f} ({-r['loss_points'][n]:+5.1f})" for n in INPUTS)
        print(f"{task:<22}{cells}")
    for m in (procrustes, ridge):
        print(
            f"map {m.kind}: held-out R² {m.metrics['holdout_r2']:.3f}, "
            f"cosine {m.metrics['holdout_cosine']:.3f}"
        )
    worst = {n: max(r["loss_points"][n] for r in results.values()) for n in INPUTS}
    print("worst loss (points): " + ", ".join(f"{n} {v:.2f}" for n, v in worst.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "users": len(users_a),
            "dim": args.dim,
            "seeds": list(args.seeds),
            "ensemble_size": args.ensemble_size,
            "excluded_profile_fields": list(LABELS),
            "tasks": results,
            "maps": {m.kind: m.metrics for m in (procrustes, ridge)},
            "worst_loss_points": worst,
            "target_loss_points": TARGET_LOSS_POINTS,
            "seconds": time.perf_counter() - started,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
