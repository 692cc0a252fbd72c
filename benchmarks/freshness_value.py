"""What freshness is worth on real data (MovieLens-100K): fresh embeddings vs a daily-batch one.

Time-ordered. A version is trained on the ratings before a cut-off (the median rating time).
After it, each user's state is brought up to time t with ``FeatureState.apply``, the refresher's
code, and re-encoded by the same frozen model, so only the state's freshness differs:

(a) **Next genres.** At every 10th rating a user makes after the cut-off (with 10 more to
    come), a ridge probe maps the embedding to the genre distribution of the next 10 ratings.
    Fresh = state with every rating up to t; frozen = the state at the cut-off (what a daily or
    weekly batch serves until its next run; an unknown user gets the profile-only state).
    Probes are fitted on half the users and scored (mean cosine) on the other half.
(b) **New users.** For held-out users with 20+ ratings: the embedding after their first 1, 5
    and 20 ratings (profile known from the start) against their full-history embedding: mean
    cosine, and the AUC of a gender probe fitted on full-history embeddings of the other half.

    python benchmarks/freshness_value.py [--data DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("encoder_service") is None:
    sys.path.insert(0, str(REPO))

from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from encoder_service.data.contract import Event  # noqa: E402
from encoder_service.data.movielens import load_movielens  # noqa: E402
from encoder_service.data.tables import Dataset  # noqa: E402
from encoder_service.encoder import Encoder  # noqa: E402
from encoder_service.features.state import FeatureState  # noqa: E402

HORIZON = 10
STEP = 10
NEW_USER_POINTS = (1, 5, 20)


def _data_dir(arg: Path | None) -> Path:
    if arg:
        return arg
    root = Path(os.environ.get("ENCODER_DATA_DIR", REPO.parent / "shared" / "data"))
    return root / "movielens-100k"


def _events(frame: pd.DataFrame) -> list[Event]:
    return [
        Event(
            user_id=str(r.user_id),
            item_id=str(r.item_id),
            timestamp=float(r.timestamp),
            event_type=str(r.event_type),
            weight=float(r.weight),
        )
        for r in frame.itertuples(index=False)
    ]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.where(na > 0, na, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="MovieLens-100K folder.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from encoder_service.training.pipeline import train_version
    from encoder_service.training.train import TrainConfig

    data = load_movielens(_data_dir(args.data))
    events = data.events.sort_values("timestamp", kind="stable")
    cut = float(events["timestamp"].median())
    before = events[events["timestamp"] < cut].sort_values(["user_id", "timestamp"])
    after = events[events["timestamp"] >= cut]
    seen_users = set(before["user_id"])
    train_set = Dataset(
        events=before.reset_index(drop=True),
        users=data.users[data.users["user_id"].isin(seen_users)].reset_index(drop=True),
        items=data.items,
        name="ml100k-before-cut",
    )
    with tempfile.TemporaryDirectory() as folder:
        trained = train_version(
            train_set,
            version="cut",
            out_dir=Path(folder),
            config=TrainConfig(embedding_dim=32, epochs=args.epochs, seed=0),
            item_vector_dim=16,
            progress=False,
        )
        encoder = Encoder(trained.artifacts())
    catalogs = {encoder.catalog_id: encoder.catalog}
    profiles = {
        str(row["user_id"]): {k: row[k] for k in data.profile_fields() if pd.notna(row[k])}
        for row in data.users.to_dict("records")
    }
    at_cut = dict(zip(trained.user_ids, trained.states, strict=True))
    genres = sorted({g for cats in data.items["categories"] for g in cats})
    item_genres = {
        str(i): c for i, c in zip(data.items["item_id"], data.items["categories"], strict=True)
    }
    rng = np.random.default_rng(0)
    users = sorted(events["user_id"].astype(str).unique())
    test_users = set(rng.choice(users, size=len(users) // 2, replace=False))

    # (a) next-10 genres: fresh vs frozen
    rows: dict[str, list] = {"fresh": [], "frozen": [], "target": [], "test": []}
    for user, frame in after.groupby("user_id"):
        user = str(user)
        later = _events(frame.sort_values("timestamp", kind="stable"))
        frozen = copy.deepcopy(at_cut.get(user) or FeatureState(profile=dict(profiles[user])))
        fresh = copy.deepcopy(frozen)
        frozen_vec = encoder.encode_states([frozen])[0]
        for k, e in enumerate(later):
            fresh.apply(e, catalogs)
            if (k + 1) % STEP or k + 1 + HORIZON > len(later):
                continue
            target = np.zeros(len(genres))
            for nxt in later[k + 1 : k + 1 + HORIZON]:
                for g in item_genres.get(nxt.item_id, ()):
                    target[genres.index(g)] += 1
            rows["fresh"].append(encoder.encode_states([fresh])[0])
            rows["frozen"].append(frozen_vec)
            rows["target"].append(target / max(target.sum(), 1))
            rows["test"].append(user in test_users)
    test = np.asarray(rows["test"])
    target = np.asarray(rows["target"])
    figures: list[dict] = []
    print(
        f"cut-off {pd.Timestamp(cut, unit='s'):%Y-%m-%d}: {len(before)} ratings before, "
        f"{len(after)} after; {len(test)} prediction points ({test.sum()} held out)"
    )
    baseline = np.tile(target[~test].mean(axis=0), (test.sum(), 1))
    scores = {"global mean (no embedding)": float(_cosine(baseline, target[test]).mean())}
    for name in ("frozen", "fresh"):
        x = np.asarray(rows[name])
        probe = Ridge(alpha=1.0).fit(x[~test], target[~test])
        scores[f"{name} embedding"] = float(_cosine(probe.predict(x[test]), target[test]).mean())
    print("\n(a) next-10-ratings genre distribution, cosine of the probe's prediction")
    for name, value in scores.items():
        print(f"  {name:<30} {value:.4f}")
        figures.append(
            {
                "name": f"next_genres.{name}",
                "value": value,
                "unit": "cosine",
                "target": None,
                "held": None,
            }
        )

    # (b) new users after 1, 5, 20 ratings
    by_user = {
        str(u): _events(f.sort_values("timestamp", kind="stable"))
        for u, f in events.groupby("user_id")
    }
    eligible = [u for u in users if len(by_user[u]) >= max(NEW_USER_POINTS)]
    full = {}
    partial: dict[int, dict[str, np.ndarray]] = {k: {} for k in NEW_USER_POINTS}
    for user in eligible:
        state = FeatureState(profile=dict(profiles[user]))
        for k, e in enumerate(by_user[user], start=1):
            state.apply(e, catalogs)
            if k in partial:
                partial[k][user] = encoder.encode_states([state])[0]
        full[user] = encoder.encode_states([state])[0]
    gender = {str(r["user_id"]): r["gender"] == "M" for r in data.users.to_dict("records")}
    train_u = [u for u in eligible if u not in test_users]
    test_u = [u for u in eligible if u in test_users]
    clf = LogisticRegression(max_iter=2000).fit(
        np.stack([full[u] for u in train_u]), [gender[u] for u in train_u]
    )
    y = [gender[u] for u in test_u]
    print(f"\n(b) new users ({len(test_u)} held out with >= {max(NEW_USER_POINTS)} ratings)")
    print(f"  {'ratings seen':<14} {'cosine to full':>15} {'gender AUC':>11}")
    for k in (*NEW_USER_POINTS, "all"):
        vecs = full if k == "all" else partial[k]  # type: ignore[index]
        x = np.stack([vecs[u] for u in test_u])
        cos = float(_cosine(x, np.stack([full[u] for u in test_u])).mean())
        auc = float(roc_auc_score(y, clf.predict_proba(x)[:, 1]))
        print(f"  {k!s:<14} {cos:>15.3f} {auc:>11.3f}")
        figures.append(
            {
                "name": f"new_user@{k}.cosine_to_full",
                "value": cos,
                "unit": "cosine",
                "target": None,
                "held": None,
            }
        )
        figures.append(
            {
                "name": f"new_user@{k}.gender_auc",
                "value": auc,
                "unit": "AUC",
                "target": None,
                "held": None,
            }
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
