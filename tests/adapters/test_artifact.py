"""Fit, save, load and predict through a real API; refuse a server the head was not trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from downstream_adapters.adapter import Adapter
from downstream_adapters.artifact import load, save
from downstream_adapters.errors import UnknownVersionError
from downstream_adapters.heads import LinearHead

from downstream_adapters import EmbeddingClient, Pin, VersionMismatchError
from tests.adapters.conftest import USERS, Service


def test_fit_save_load_predict(service: Service, tmp_path: Path) -> None:
    with EmbeddingClient(service.url, version="v1", api_key=service.read_key, batch_size=50) as c:
        batch = c.fetch(USERS)
        labels = np.where(batch.vectors[:, 0] > 0, "yes", "no")
        head = LinearHead(class_weight="balanced").fit(batch.vectors[:90], labels[:90])
        head.calibrate(batch.vectors[90:], labels[90:])
        path = save(tmp_path / "head", head, c.info().pin, {"task": "sign"})

    artifact = load(path)
    assert artifact.pin == Pin("v1", service.dim, "schema-v1")
    assert artifact.metadata == {"task": "sign"}
    adapter = Adapter.connect(path, service.url, api_key=service.read_key, batch_size=50)
    proba = adapter.predict_proba(USERS[90:] + ["nobody"])
    np.testing.assert_allclose(proba[:-1], head.predict_proba(batch.vectors[90:]), rtol=1e-6)
    assert np.isnan(proba[-1]).all()
    assert (adapter.artifact.head.predict(batch.vectors[90:]) == labels[90:]).mean() > 0.8
    assert np.isfinite(adapter.ood_score(USERS[:3])).all()
    adapter.close()


@pytest.mark.parametrize(
    ("pin", "complaint"),
    [
        (Pin("v1", 32, "schema-v1"), "embedding_dim: trained on 32, server has 16"),
        (Pin("v1", 16, "schema-old"), "schema_hash: trained on 'schema-old'"),
    ],
)
def test_a_mismatched_server_is_refused(
    service: Service, tmp_path: Path, pin: Pin, complaint: str
) -> None:
    rng = np.random.default_rng(0)
    head = LinearHead(epochs=2).fit(rng.normal(size=(20, pin.dim)), np.arange(20) % 2)
    path = save(tmp_path / "head.npz", head, pin)
    with pytest.raises(VersionMismatchError, match=complaint):
        Adapter.connect(path, service.url, api_key=service.read_key)


def test_a_version_the_server_lacks_is_refused(service: Service, tmp_path: Path) -> None:
    head = LinearHead(epochs=2).fit(np.eye(16), np.arange(16) % 2)
    path = save(tmp_path / "head.npz", head, Pin("v7", 16, "schema-v7"))
    with pytest.raises(UnknownVersionError):
        Adapter.connect(path, service.url, api_key=service.read_key)
