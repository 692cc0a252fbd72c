"""The encoders of every live version, loaded from the registry and kept in step with it.

The registry lives in Redis (manifests, ONNX bytes, catalogues), so a refresher needs no shared
disk: it lists the versions every ``registry_poll_seconds``, builds an encoder for each new live
one (every status but ``retired``) and drops the ones that were retired. A version's artefacts
never change once registered, so an encoder, once built, stays valid for as long as its version
is live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from types import MappingProxyType

import redis

from encoder_service.encoder import Encoder, ModelArtifacts, SchemaHashMismatchError
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.translation import CatalogTranslation, translations_between
from encoder_service.registry import Registry, UnknownVersionError

log = logging.getLogger(__name__)

RETIRED = "retired"


class LiveVersions:
    """An encoder per live version; :attr:`encoders` is an immutable snapshot, safe to share
    with the readiness thread while the consumer thread reloads."""

    def __init__(self, client: redis.Redis, *, poll_seconds: float) -> None:
        self.registry = Registry(client)
        self.poll_seconds = poll_seconds
        self.encoders: Mapping[str, Encoder] = MappingProxyType({})
        self.translations: Mapping[str, list[CatalogTranslation]] = MappingProxyType({})
        """Item-sum maps between the live catalogues (see ``features.translation``)."""
        self.refused: dict[str, str] = {}
        """Live versions this code cannot run, with the reason (a schema hash mismatch, say)."""
        self._next_poll = 0.0

    def maybe_reload(self) -> bool:
        """Reload when the poll interval has passed; True when the set of encoders changed."""
        if time.monotonic() < self._next_poll:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Read the registry now; True when the set of encoders changed."""
        self._next_poll = time.monotonic() + self.poll_seconds
        live = [m for m in self.registry.list() if m.get("status") != RETIRED]
        current = dict(self.encoders)
        loaded: dict[str, Encoder] = {}
        for manifest in live:
            version = manifest["version"]
            encoder = current.get(version) or self._load(manifest)
            if encoder is not None:
                loaded[version] = encoder
        changed = loaded.keys() != current.keys()
        if changed:
            log.info("live versions: %s", ", ".join(sorted(loaded)) or "none")
            catalogs = (e.catalog for e in loaded.values())
            self.translations = MappingProxyType(translations_between(catalogs))
        self.encoders = MappingProxyType(loaded)
        return changed

    def _load(self, manifest: dict) -> Encoder | None:
        version = manifest["version"]
        if version in self.refused:
            return None
        try:
            artifacts = ModelArtifacts(
                manifest=manifest,
                model=self.registry.model_bytes(version),
                catalog=self.registry.catalog_bytes(version),
            )
            encoder = Encoder(artifacts)
        except (SchemaHashMismatchError, UnknownVersionError, ValueError) as exc:
            # Refused once and remembered: retrying every poll would only repeat the log line.
            self.refused[version] = str(exc)
            log.error("version %s is live but cannot be refreshed: %s", version, exc)
            return None
        log.info("loaded version %s (dim %d, %s)", version, encoder.dim, encoder.dtype)
        return encoder

    def catalogs(self) -> dict[str, ItemCatalog]:
        """Catalogue hash -> catalogue, what :meth:`FeatureState.apply` needs."""
        return {e.catalog_id: e.catalog for e in self.encoders.values()}
