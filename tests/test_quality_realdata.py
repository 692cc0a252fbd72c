"""Quality smoke on real data: embeddings trained without the label must still predict it.

MovieLens-100K users' gender is left out of the features; a logistic-regression probe on the
embedding alone must beat chance clearly. The full comparison against baselines is the job of the
adapters' evaluation harness.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from encoder_service.encoder import Encoder
from encoder_service.training.pipeline import train_version
from encoder_service.training.train import TrainConfig

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_movielens_embeddings_predict_held_out_gender(
    shared_data_dir: Path, tmp_path: Path
) -> None:
    folder = shared_data_dir / "movielens-100k"
    if not (folder / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found under {shared_data_dir} (set ENCODER_DATA_DIR)")
    from encoder_service.data.movielens import load_movielens

    dataset = load_movielens(folder)
    trained = train_version(
        dataset,
        version="ml",
        out_dir=tmp_path,
        config=TrainConfig(embedding_dim=32, epochs=40, seed=0),
        exclude_profile=["gender"],
        progress=False,
    )
    embeddings = Encoder(trained.artifacts()).encode_features(trained.features)
    genders = dataset.users.set_index("user_id").loc[trained.user_ids, "gender"].to_numpy()
    labels = (genders == "F").astype(int)
    scores = np.zeros(len(labels))
    for train_idx, test_idx in StratifiedKFold(5, shuffle=True, random_state=0).split(
        embeddings, labels
    ):
        probe = LogisticRegression(max_iter=2000, class_weight="balanced", C=0.5)
        probe.fit(embeddings[train_idx], labels[train_idx])
        scores[test_idx] = probe.predict_proba(embeddings[test_idx])[:, 1]
    auc = roc_auc_score(labels, scores)
    print(f"MovieLens-100K gender probe AUC (5-fold, gender excluded from features): {auc:.3f}")
    assert auc > 0.62
