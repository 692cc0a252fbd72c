"""Task heads on top of user embeddings; training needs the ``torch`` extra.

Every classifier head exposes calibrated probabilities (temperature scaling) and an
out-of-distribution score, and saves with :mod:`downstream_adapters.artifact`.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("task heads need torch: pip install 'downstream-adapters[torch]'") from exc

from downstream_adapters.heads.base import ClassifierHead
from downstream_adapters.heads.linear import LinearHead
from downstream_adapters.heads.matching import MatchingHead
from downstream_adapters.heads.mlp import MLPHead
from downstream_adapters.heads.multitask import MultiTaskHead
from downstream_adapters.heads.relation import RelationHead

HEADS: dict[str, type[ClassifierHead]] = {
    cls.kind: cls for cls in (LinearHead, MLPHead, MatchingHead, RelationHead)
}

__all__ = [
    "HEADS",
    "ClassifierHead",
    "LinearHead",
    "MLPHead",
    "MatchingHead",
    "MultiTaskHead",
    "RelationHead",
]
