"""Downstream adapters: read user embeddings from the encoder service over HTTP, pinned to a
version, and train, save and serve small task heads on them.

The core (client, errors, cache, artefact format) needs only numpy, httpx and tenacity; the
heads need the ``torch`` extra and the evaluation harness the ``eval`` extra.
"""

from downstream_adapters.client import AsyncEmbeddingClient, EmbeddingClient
from downstream_adapters.errors import AdapterError, ApiError, VersionMismatchError
from downstream_adapters.retry import RetryPolicy
from downstream_adapters.wire import Embeddings, Pin, VersionInfo

__all__ = [
    "AdapterError",
    "ApiError",
    "AsyncEmbeddingClient",
    "EmbeddingClient",
    "Embeddings",
    "Pin",
    "RetryPolicy",
    "VersionInfo",
    "VersionMismatchError",
]
