"""Saving and loading a trained head together with the embedding version it was trained on.

One ``.npz`` file: the head's arrays plus a JSON header holding the format, the head's kind and
config, and the pin (version, embedding dim, schema hash). Loading never unpickles anything, so
a head file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from downstream_adapters.errors import AdapterError
from downstream_adapters.wire import Pin

FORMAT = "downstream-adapters/head/1"
_HEADER = "__header__"


class Head(Protocol):
    kind: str

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...


@dataclass
class Artifact:
    """A loaded head, the pin it was trained on, and free-form metadata (task, metrics...)."""

    head: Any
    pin: Pin
    metadata: dict[str, Any] = field(default_factory=dict)


def save(path: str | Path, head: Head, pin: Pin, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``head`` and its ``pin`` to ``path`` (``.npz`` is appended if missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    config, arrays = head.state()
    header = {"format": FORMAT, "head": config, "pin": asdict(pin), "metadata": metadata or {}}
    encoded = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with path.open("wb") as out:
        np.savez(out, **{_HEADER: encoded}, **arrays)
    return path


def load(path: str | Path) -> Artifact:
    """Read a head written by :func:`save`; needs the ``torch`` extra to rebuild the module."""
    from downstream_adapters.heads import HEADS, MultiTaskHead

    with np.load(Path(path), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays.pop(_HEADER).tobytes())
    if header.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a head file of format {FORMAT!r}")
    kinds: dict[str, Any] = {**HEADS, MultiTaskHead.kind: MultiTaskHead}
    kind = header["head"]["kind"]
    if kind not in kinds:
        raise AdapterError(f"{path} holds an unknown head kind {kind!r}")
    head = kinds[kind].from_state(header["head"], arrays)
    return Artifact(head, Pin(**header["pin"]), header["metadata"])
