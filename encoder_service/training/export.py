"""Export the trained encoder to ONNX, prove it computes what torch computes, describe it.

The serving side runs the encoder with onnxruntime and never imports torch, so everything it
needs is in two files: ``encoder.onnx`` (raw features in, embedding out, standardisation inside,
weights inside) and ``manifest.json`` (what the model expects and how it was made).

Exporter: torch 2.13 defaults to the ``torch.export``-based exporter (``dynamo=True``), which by
default writes the weights to a separate ``.onnx.data`` file; a model folder that silently needs
a second file breaks as soon as someone copies only the ``.onnx``. We keep the default exporter
(the TorchScript one still works in 2.13 but warns that it will be removed) and pass
``external_data=False``, which is fine for an encoder far below ONNX's 2 GB protobuf limit, then
verify that no initializer points to external data.
"""

from __future__ import annotations

import json
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.external_data_helper import uses_external_data

import encoder_service
from encoder_service.features.schema import FeatureSchema
from encoder_service.training.model import MultiGroupAutoencoder

INPUT_NAME = "features"
OUTPUT_NAME = "embedding"
OPSET_VERSION = 18
PARITY_TOLERANCE = 1e-4
"""Largest absolute difference between torch and onnxruntime embeddings that we accept."""

MODEL_FILE = "encoder.onnx"
CATALOG_FILE = "catalog.npz"
MANIFEST_FILE = "manifest.json"

PARITY_BATCH_SIZE = 4096
"""Rows per onnxruntime call in :func:`check_parity`; only bounds memory."""


class ExportError(RuntimeError):
    """The exported file is not the single, valid ONNX model the serving side expects."""


class ParityError(AssertionError):
    """onnxruntime's embeddings differ from torch's by more than the tolerance."""


def export_encoder(model: MultiGroupAutoencoder, path: Path, *, input_dim: int) -> Path:
    """Write the encoder as one self-contained ONNX file and return its path.

    The graph maps ``features`` float32 [batch, input_dim] (raw, unstandardised) to
    ``embedding`` float32 [batch, embedding_dim]; the batch axis is dynamic. The file is checked
    with ``onnx.checker`` (including shape inference) before this returns.
    """
    if input_dim != model.input_dim:
        raise ValueError(f"input_dim={input_dim} but the model was built for {model.input_dim}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # torch's own pytree code trips its LeafSpec deprecation; nothing a caller can fix.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            torch.onnx.export(
                model.encoder,
                (torch.zeros(2, input_dim),),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET_VERSION,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    finally:
        model.train(was_training)
    _verify_single_file(path)
    return path


def _verify_single_file(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    external = [t.name for t in graph.initializer if uses_external_data(t)]
    if external:
        raise ExportError(f"{path.name} keeps weights in external files: {external[:5]}")


def check_parity(
    model: MultiGroupAutoencoder,
    onnx_path: Path,
    x: np.ndarray,
    *,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max absolute difference between torch ``encode`` and onnxruntime on inputs ``x`` [N, D].

    Run it on real feature vectors: random inputs can miss the ranges where a wrongly folded
    standardisation or a different activation approximation shows.

    Raises:
        ParityError: if the difference exceeds ``tolerance``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("x must be a non-empty [N, D] matrix")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(x), PARITY_BATCH_SIZE):
                batch = x[start : start + PARITY_BATCH_SIZE]
                expected = model.encode(torch.from_numpy(batch)).numpy()
                (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
                if actual.shape != expected.shape:
                    raise ParityError(f"onnx shape {actual.shape} != torch shape {expected.shape}")
                worst = max(worst, float(np.abs(actual - expected).max()))
    finally:
        model.train(was_training)
    if not worst <= tolerance:
        raise ParityError(f"max abs difference {worst:.3g} exceeds tolerance {tolerance:.3g}")
    return worst


def build_manifest(
    *,
    version: str,
    schema: FeatureSchema,
    embedding_dim: int,
    catalog_hash: str,
    dataset_summary: dict[str, Any],
    metrics: dict[str, Any],
    parent_version: str | None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Describe a model version as a JSON-ready dict of plain types.

    ``dataset_summary`` is stored as ``training`` and should name the data and its window:
    ``data``, ``window_start`` / ``window_end`` (ISO-8601), ``n_users``, ``n_events``,
    ``n_items``. Numpy scalars and arrays, datetimes and paths in it or in ``metrics`` are
    converted to plain JSON values; NaN or infinite numbers are refused when written.
    """
    return {
        "version": version,
        "embedding_dim": int(embedding_dim),
        "input_dim": schema.input_dim,
        "dtype": dtype,
        "schema": schema.to_dict(),
        "schema_hash": schema.hash,
        "catalog_hash": catalog_hash,
        "training": _plain(dataset_summary),
        "metrics": _plain(metrics),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parent_version": parent_version,
        "libraries": {
            "encoder_service": encoder_service.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "files": {"model": MODEL_FILE, "catalog": CATALOG_FILE},
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def write_manifest(manifest: dict[str, Any], folder: Path) -> Path:
    """Write ``manifest.json`` into ``folder`` atomically (a reader never sees half a file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)
    target = folder / MANIFEST_FILE
    partial = folder / (MANIFEST_FILE + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, target)
    return target


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the model version stored in ``folder``."""
    return json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
