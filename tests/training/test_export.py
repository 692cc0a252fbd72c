"""ONNX export of the encoder, torch/onnxruntime parity, and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from encoder_service.features.schema import FeatureSchema
from encoder_service.training.export import (
    MANIFEST_FILE,
    PARITY_TOLERANCE,
    ParityError,
    build_manifest,
    check_parity,
    export_encoder,
    read_manifest,
    write_manifest,
)
from encoder_service.training.train import TrainConfig, train_autoencoder

from . import synthetic_features, tiny_schema

SCHEMA = tiny_schema()


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return synthetic_features(SCHEMA, 800, seed=11)


@pytest.fixture(scope="module")
def model(features: np.ndarray):
    config = TrainConfig(embedding_dim=16, epochs=2, batch_size=64, seed=2, num_threads=1)
    return train_autoencoder(features, SCHEMA, config, progress=False).model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return export_encoder(model, folder / "encoder.onnx", input_dim=SCHEMA.input_dim)


def test_export_writes_one_valid_self_contained_file(exported: Path) -> None:
    assert sorted(p.name for p in exported.parent.iterdir()) == ["encoder.onnx"]
    onnx.checker.check_model(str(exported), full_check=True)
    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == ["features"]
    assert [o.name for o in graph.output] == ["embedding"]
    (features_dims,) = [i.type.tensor_type.shape.dim for i in graph.input]
    assert features_dims[0].dim_param and not features_dims[0].dim_value
    assert features_dims[1].dim_value == SCHEMA.input_dim
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 16
    opset = {o.domain: o.version for o in onnx.load(str(exported)).opset_import}
    assert opset[""] >= 17


@pytest.mark.parametrize("batch", [1, 257])
def test_onnx_matches_torch(model, exported: Path, features: np.ndarray, batch: int) -> None:
    difference = check_parity(model, exported, features[:batch])
    assert difference <= PARITY_TOLERANCE


def test_batch_axis_is_dynamic(model, exported: Path, features: np.ndarray) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    whole = session.run(None, {"features": features[:300]})[0]
    assert whole.dtype == np.float32 and whole.shape == (300, 16)
    for size in (1, 2, 7, 300):
        (part,) = session.run(None, {"features": features[:size]})
        assert np.allclose(part, whole[:size], atol=1e-6)


def test_standardisation_is_inside_the_graph(model, exported: Path, features: np.ndarray) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    scaled = features[:20].copy()
    scaled[:, SCHEMA.group("activity").start] += 1000.0
    raw, shifted = (session.run(None, {"features": x})[0] for x in (features[:20], scaled))
    assert not np.allclose(raw, shifted, atol=1e-2)
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(scaled)).numpy()
    assert np.abs(shifted - expected).max() <= PARITY_TOLERANCE


def test_parity_check_catches_a_different_model(
    model, exported: Path, features: np.ndarray
) -> None:
    changed = type(model).from_schema(SCHEMA, 16)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.encoder.branches[0].net[0].bias.add_(0.5)
    with pytest.raises(ParityError):
        check_parity(changed, exported, features[:10])


def test_export_refuses_a_wrong_input_dim(model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_dim"):
        export_encoder(model, tmp_path / "encoder.onnx", input_dim=SCHEMA.input_dim + 1)
    assert not any(tmp_path.iterdir())


def test_manifest_round_trips(tmp_path: Path) -> None:
    summary = {
        "data": "synthetic",
        "window_start": "2024-01-01T00:00:00+00:00",
        "window_end": "2024-03-01T00:00:00+00:00",
        "n_users": np.int64(800),
        "n_events": 12_000,
        "n_items": 300,
    }
    metrics = {"val_loss": np.float32(1.25), "val_loss_per_group": {"affinity": 0.5}}
    manifest = build_manifest(
        version="v2",
        schema=SCHEMA,
        embedding_dim=16,
        catalog_hash="sha256:abc",
        dataset_summary=summary,
        metrics=metrics,
        parent_version="v1",
    )
    assert write_manifest(manifest, tmp_path) == tmp_path / MANIFEST_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE]
    loaded = read_manifest(tmp_path)
    assert loaded == json.loads(json.dumps(manifest))
    assert loaded["training"]["n_users"] == 800 and loaded["metrics"]["val_loss"] == 1.25
    assert loaded["input_dim"] == SCHEMA.input_dim and loaded["dtype"] == "float32"
    assert loaded["files"] == {"model": "encoder.onnx", "catalog": "catalog.npz"}
    assert FeatureSchema.from_dict(loaded["schema"]).hash == loaded["schema_hash"] == SCHEMA.hash
    assert set(loaded["libraries"]) == {"encoder_service", "torch", "onnx", "onnxruntime", "numpy"}
    assert loaded["created_at"].endswith("+00:00")


def test_manifest_refuses_nan(tmp_path: Path) -> None:
    manifest = build_manifest(
        version="v1",
        schema=SCHEMA,
        embedding_dim=16,
        catalog_hash="sha256:abc",
        dataset_summary={},
        metrics={"val_loss": float("nan")},
        parent_version=None,
    )
    with pytest.raises(ValueError):
        write_manifest(manifest, tmp_path)
    assert not (tmp_path / MANIFEST_FILE).exists()
