"""Entire-space transfer to a small target domain: the cross-domain adapter.

The selection stages (:mod:`.graph`, :mod:`.domain`) are numpy only and import with the package
core; the networks (:mod:`.model`, :mod:`.distill`, :mod:`.adapter`) need the ``torch`` extra and
are loaded on first use of their names, so ``import downstream_adapters.crossdomain`` works
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from downstream_adapters.crossdomain.domain import (
    DomainClassifier,
    fine_select,
    importance_weights,
)
from downstream_adapters.crossdomain.graph import (
    InteractionGraph,
    coarse_select,
    node_lift,
    personalized_pagerank,
    sample_scores,
)

_NEEDS_TORCH = {
    "CrossDomainAdapter": "adapter",
    "DomainSamples": "adapter",
    "Selection": "adapter",
    "Candidate": "adapter",
    "BinaryMLP": "model",
    "Distillation": "model",
    "distillation_weight": "distill",
    "distillation_loss": "distill",
}


def __getattr__(name: str) -> Any:
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        loaded = importlib.import_module(f"{__name__}.{module}")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{name} needs torch: pip install 'downstream-adapters[torch]'") from exc
    return getattr(loaded, name)


__all__ = [
    "DomainClassifier",
    "InteractionGraph",
    "coarse_select",
    "fine_select",
    "importance_weights",
    "node_lift",
    "personalized_pagerank",
    "sample_scores",
    *_NEEDS_TORCH,
]
