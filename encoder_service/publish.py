"""Publish a model version: encode users with onnxruntime and bulk-load them into Redis.

Two paths. :func:`publish_version` loads a training snapshot (states given by the caller): it
checks everything that can be refused before the first write, writes under the new version's
own keys, and registers the manifest last, so the version appears only once complete; a failure
removes its partial keys and leaves other versions untouched.

:func:`publish_from_live_states` fills a version from the feature states in Redis while the
refresher keeps applying events. Registering last would lose those events for the new version,
so it registers the version as ``shadow`` *first* (refreshers then encode every user they touch
under it too) and backfills with writes guarded by WATCH on each user's state: an embedding is
written only if the state it was computed from is still the current one, so the backfill never
overwrites what a refresher wrote from a newer state. Events a refresher applied before it had
loaded the new version are caught by a final pass over users whose ``meta.updated_at`` is not
older than the registration, run once every refresher has had time to load the version.

A version trained with a new item catalogue finds no item sums under that catalogue in states
built before it; the backfill carries them over from another version's catalogue through a
linear map fitted on the shared items (:mod:`encoder_service.features.translation`) and writes
the states back in the same guarded transaction.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import redis
from tqdm import tqdm

from encoder_service import cluster
from encoder_service.alignment import KINDS, AlignmentError, AlignmentMap, align_versions
from encoder_service.encoder import Encoder, ModelArtifacts
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.state import FeatureState
from encoder_service.features.translation import (
    CatalogTranslation,
    fill_missing_sums,
    fit_translations,
)
from encoder_service.redis_connection import sync_client
from encoder_service.registry import Registry, SchemaMismatchError
from encoder_service.settings import get_settings
from encoder_service.store import (
    READ_BATCH,
    EmbeddingStore,
    decode_meta,
    embedding_key,
    encode_embeddings,
    meta_key,
    state_key,
)

log = logging.getLogger(__name__)

MAX_CONFLICTS = 10
CLOCK_SKEW_SECONDS = 60.0
"""Refreshers stamp ``meta.updated_at`` with their own clock; the final pass looks this far back
before the registration, so a refresher's slightly late clock cannot hide a user from it."""


class PublishConflictError(RuntimeError):
    """A user's state changed under every one of the backfill's tries."""


class StoreFullError(RuntimeError):
    """Redis refused a write at ``maxmemory``; the partial version was removed."""


def _store_full(client: redis.Redis, version: str, exc: redis.OutOfMemoryError) -> StoreFullError:
    """The error to raise when Redis ran out of memory during the publish of ``version``.

    Says what happened, what was undone and what still serves, so that an operator reading
    one line knows the service is intact and what to change.
    """
    try:
        # redis-py parses a CONFIG GET reply into str keys and values whatever the client.
        config = cast(dict[str, str], client.config_get("maxmemory"))
        limit = int(config.get("maxmemory", 0))
        active = Registry(client).active()
    except redis.RedisError:  # CONFIG may be disabled on a managed server
        limit, active = 0, None
    size = f" ({limit / 2**20:.0f} MiB)" if limit else ""
    return StoreFullError(
        f"Redis is out of memory: it refused a write at its maxmemory limit{size} while "
        f"publishing {version!r} ({exc}). The partial version was removed; the active version "
        f"{active!r} is untouched and still served. Free memory or raise maxmemory, then "
        "publish again."
    )


@dataclass(frozen=True)
class PublishReport:
    """What a publish did, for the CLI to print and benchmarks to record."""

    version: str
    users: int
    seconds: float
    active: str | None
    late_users: int = 0
    """Users re-encoded by the final pass because events reached them during the backfill."""
    alignment: dict[str, Any] | None = None
    """Kind and held-out quality of the map to the parent version, when one was fitted."""

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")


def publish_version(
    client: redis.Redis,
    artifacts: ModelArtifacts,
    user_ids: Sequence[str],
    states: Sequence[FeatureState],
    *,
    features: np.ndarray | None = None,
    write_states: bool = True,
    activate: bool | None = None,
    batch_size: int = 4096,
    by: str = "cli",
    progress: bool = True,
) -> PublishReport:
    """Encode ``states`` and publish them as ``artifacts``' version.

    Args:
        user_ids / states: aligned; users without events still get an embedding (from their
            profile alone), which is what a cold-start reader expects.
        features: the states already vectorised with this version's schema (the training job
            has them); skips vectorising again, which dominates the cost of a publish.
        write_states: also store each user's feature state (the training snapshot) so the
            refresher continues from it.
        activate: make this the active version; ``None`` activates it only when no version is
            active yet.
    """
    if len(user_ids) != len(states) or (features is not None and len(features) != len(states)):
        raise ValueError("user_ids, states and features must be aligned")
    encoder = Encoder(artifacts)
    existing = check_publishable(client, artifacts)
    started = time.perf_counter()
    try:
        write_snapshot(
            client,
            encoder,
            user_ids,
            states,
            features=features,
            write_states=write_states,
            batch_size=batch_size,
            progress=progress,
        )
        # Registered inside the guard: a full store can refuse the registry write too.
        return register_snapshot(
            client, artifacts, users=len(user_ids), started=started, activate=activate, by=by
        )
    except BaseException as exc:
        if existing is None:
            log.error("publish of %s failed; removing its partial keys", encoder.version)
            Registry(client).unregister(encoder.version)
            EmbeddingStore(client).delete_version(encoder.version)
        if isinstance(exc, redis.OutOfMemoryError):
            raise _store_full(client, encoder.version, exc) from exc
        raise


def check_publishable(client: redis.Redis, artifacts: ModelArtifacts) -> dict[str, Any] | None:
    """The stored manifest of the version, if any; raises if it exists under another schema."""
    return _existing(Registry(client), artifacts)


def write_snapshot(
    client: redis.Redis,
    encoder: Encoder,
    user_ids: Sequence[str],
    states: Sequence[FeatureState],
    *,
    features: np.ndarray | None = None,
    write_states: bool = True,
    batch_size: int = 4096,
    progress: bool = True,
) -> int:
    """Encode and store ``user_ids``' embeddings (and states) without registering anything.

    Processes that share a publish each write their own slice of the users with this, and one
    of them registers the version with :func:`register_snapshot` once all have succeeded.
    """
    store = EmbeddingStore(client)
    for lo, hi in _batches(len(user_ids), batch_size, progress, "publish"):
        batch_states = states[lo:hi]
        embeddings = (
            encoder.encode_states(batch_states)
            if features is None
            else encoder.encode_features(features[lo:hi])
        )
        store.write_embeddings(encoder.version, user_ids[lo:hi], embeddings, dtype=encoder.dtype)
        if write_states:
            store.write_states(user_ids[lo:hi], [s.to_bytes() for s in batch_states])
    return len(user_ids)


def register_snapshot(
    client: redis.Redis,
    artifacts: ModelArtifacts,
    *,
    users: int,
    started: float,
    activate: bool | None = None,
    by: str = "cli",
) -> PublishReport:
    """Register a version whose embeddings are all written, align it to its parent, and
    activate it when asked (or when no version is active yet)."""
    registry = Registry(client)
    version = artifacts.manifest["version"]
    manifest = {**artifacts.manifest, "published_at": datetime.now(UTC).isoformat()}
    registry.register(manifest, artifacts.model, artifacts.catalog, by=by)
    alignment = _align_to_parent(client, manifest)
    if activate or (activate is None and registry.active() is None):
        registry.promote(version, by=by)
    seconds = time.perf_counter() - started
    report = PublishReport(version, users, seconds, registry.active(), alignment=alignment)
    log.info(
        "published %d users as %s in %.1fs (%.0f users/s)",
        report.users,
        report.version,
        seconds,
        report.users_per_second,
    )
    return report


def publish_from_live_states(
    client: redis.Redis,
    artifacts: ModelArtifacts,
    *,
    activate: bool | None = None,
    batch_size: int = 4096,
    by: str = "cli",
    progress: bool = True,
    settle_seconds: float | None = None,
    processes: int = 1,
    redis_url: str | None = None,
) -> PublishReport:
    """Publish ``artifacts`` for every user whose feature state is in Redis, losing no event.

    See the module docstring for the protocol. ``settle_seconds`` (default twice the
    refresher's ``registry_poll_seconds`` plus one) is how long after registering the final
    pass waits, so that every running refresher has loaded the new version by then.

    ``processes`` > 1 splits the backfill into that many contiguous slices of the users, each
    encoded and written by its own process connected to ``redis_url`` (the same server as
    ``client``): encoding is CPU-bound and single-threaded per process, so this is what scales
    a backfill with cores. Registration, the final pass and activation stay in this process,
    so the version is registered once whatever the count.

    Raises:
        SchemaMismatchError: the version id exists with another schema hash.
        SchemaHashMismatchError: this code does not build the model's feature schema.
    """
    if processes > 1 and redis_url is None:
        raise ValueError("a backfill over several processes needs the redis_url to connect to")
    encoder = Encoder(artifacts)
    registry = Registry(client)
    store = EmbeddingStore(client)
    existing = _existing(registry, artifacts)
    if settle_seconds is None:
        settle_seconds = 2 * get_settings().registry_poll_seconds + 1
    started = time.perf_counter()
    registered_at = time.time()
    manifest = {**artifacts.manifest, "published_at": datetime.now(UTC).isoformat()}
    try:
        translations = _item_sum_translations(registry, encoder, manifest)
        registry.register(manifest, artifacts.model, artifacts.catalog, by=by)
        users = list(dict.fromkeys(store.iter_state_users()))
        if processes > 1:
            assert redis_url is not None
            written = _backfill_in_processes(
                redis_url, artifacts, users, batch_size, processes, progress, translations
            )
        else:
            written = _backfill(client, encoder, users, batch_size, progress, translations)
        time.sleep(max(0.0, registered_at + settle_seconds - time.time()))
        late = _touched_since(client, registered_at - CLOCK_SKEW_SECONDS, set(users))
        for lo in range(0, len(late), batch_size):
            _write_current(client, encoder, late[lo : lo + batch_size], translations)
    except BaseException as exc:
        if existing is None:
            log.error("publish of %s failed; removing it and its partial keys", encoder.version)
            registry.unregister(encoder.version)
            store.delete_version(encoder.version)
        if isinstance(exc, redis.OutOfMemoryError):
            raise _store_full(client, encoder.version, exc) from exc
        raise
    alignment = _align_to_parent(client, manifest)
    if activate or (activate is None and registry.active() is None):
        registry.promote(encoder.version, by=by)
    report = PublishReport(
        encoder.version,
        written + len(set(late) - set(users)),
        time.perf_counter() - started,
        registry.active(),
        late_users=len(late),
        alignment=alignment,
    )
    log.info(
        "published %d users as %s in %.1fs; %d re-encoded after live events",
        report.users,
        report.version,
        report.seconds,
        report.late_users,
    )
    return report


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ``(lo, hi)`` ranges covering ``range(n)``, sizes differing by <= 1."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return [(n * k // shards, n * (k + 1) // shards) for k in range(shards)]


def _backfill(
    client: redis.Redis,
    encoder: Encoder,
    users: Sequence[str],
    batch_size: int,
    progress: bool,
    translations: Mapping[str, list[CatalogTranslation]],
) -> int:
    written = 0
    for lo, hi in _batches(len(users), batch_size, progress, "backfill"):
        written += _write_current(client, encoder, users[lo:hi], translations)
    return written


def _backfill_in_processes(
    redis_url: str,
    artifacts: ModelArtifacts,
    users: Sequence[str],
    batch_size: int,
    processes: int,
    progress: bool,
    translations: Mapping[str, list[CatalogTranslation]],
) -> int:
    """Backfill one slice of ``users`` per process; raises the first worker's failure after
    every worker has stopped, so the caller's clean-up never races a worker's writes."""
    # spawn, not fork: this process holds Redis connections and onnxruntime threads.
    context = multiprocessing.get_context("spawn")
    written = 0
    with (
        ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool,
        tqdm(total=len(users), desc="backfill", unit="user", disable=not progress) as bar,
    ):
        futures = {
            pool.submit(
                _backfill_worker, redis_url, artifacts, users[lo:hi], batch_size, translations
            ): hi - lo
            for lo, hi in shard_bounds(len(users), processes)
        }
        for future in as_completed(futures):
            written += future.result()
            bar.update(futures[future])
    return written


def _backfill_worker(
    redis_url: str,
    artifacts: ModelArtifacts,
    users: Sequence[str],
    batch_size: int,
    translations: Mapping[str, list[CatalogTranslation]],
) -> int:
    """One process's slice of a backfill, with its own connection and encoder."""
    with sync_client(redis_url) as client:
        return _backfill(client, Encoder(artifacts), users, batch_size, False, translations)


def _existing(registry: Registry, artifacts: ModelArtifacts) -> dict[str, Any] | None:
    """The stored manifest of the version, refusing one stored under another schema."""
    version = artifacts.manifest["version"]
    existing = registry.get(version)
    if existing is not None and existing["schema_hash"] != artifacts.manifest["schema_hash"]:
        raise SchemaMismatchError(
            f"version {version!r} is already published with schema "
            f"{existing['schema_hash']}; this model has {artifacts.manifest['schema_hash']}. "
            "Publish it under a new version id."
        )
    return existing


def _item_sum_translations(
    registry: Registry, encoder: Encoder, manifest: dict[str, Any]
) -> dict[str, list[CatalogTranslation]]:
    """Maps into this version's catalogue from the other versions' (the parent's first).

    States hold item sums only for catalogues that were live when their events arrived; a
    version with a new catalogue carries existing users' history over through these maps (see
    :mod:`encoder_service.features.translation`).
    """
    parent = manifest.get("parent_version")
    others = [m["version"] for m in registry.list() if m["version"] != encoder.version]
    others.sort(key=lambda v: v != parent)
    sources = (ItemCatalog.from_bytes(registry.catalog_bytes(v)) for v in others)
    maps = fit_translations(encoder.catalog, sources)
    return {encoder.catalog_id: maps} if maps else {}


def _write_current(
    client: redis.Redis,
    encoder: Encoder,
    users: Sequence[str],
    translations: Mapping[str, list[CatalogTranslation]],
) -> int:
    """Encode ``users`` from their current states and write the embeddings, unless a state
    changed meanwhile (WATCH); a conflicting batch is halved and retried. Returns users written.

    On a Redis Cluster the guard is per slot (:func:`_try_write_per_slot`): only the users of a
    slot that changed are read and encoded again.
    """
    if cluster.is_cluster(client):
        written = 0
        for _ in range(MAX_CONFLICTS):
            done, users = _try_write_per_slot(client, encoder, users, translations)
            written += done
            if not users:
                return written
        raise PublishConflictError(f"user {users[0]!r} kept changing during {MAX_CONFLICTS} tries")
    for _ in range(MAX_CONFLICTS):
        try:
            return _try_write(client, encoder, users, translations)
        except redis.WatchError:
            if len(users) > 1:
                mid = len(users) // 2
                return _write_current(client, encoder, users[:mid], translations) + (
                    _write_current(client, encoder, users[mid:], translations)
                )
    raise PublishConflictError(f"user {users[0]!r} kept changing during {MAX_CONFLICTS} tries")


def _encode_present(
    encoder: Encoder,
    users: Sequence[str],
    blobs: Sequence[bytes | None],
    translations: Mapping[str, list[CatalogTranslation]],
) -> tuple[list[tuple[str, bytes]], list[bytes], dict[str, bytes]]:
    """The users that have a state, their encoded embeddings, and the states that gained
    translated item sums (to be written back)."""
    present = [(u, b) for u, b in zip(users, blobs, strict=True) if b is not None]
    if not present:
        return [], [], {}
    states = [FeatureState.from_bytes(b) for _, b in present]
    filled = {
        state_key(u): s.to_bytes()
        for (u, _), s in zip(present, states, strict=True)
        if fill_missing_sums(s, translations)
    }
    values = encode_embeddings(encoder.encode_states(states), encoder.dtype)  # type: ignore[arg-type]
    return present, values, filled


def _try_write(
    client: redis.Redis,
    encoder: Encoder,
    users: Sequence[str],
    translations: Mapping[str, list[CatalogTranslation]],
) -> int:
    """One WATCHed batch; states that gained translated item sums are written back with it."""
    keys = [state_key(u) for u in users]
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(*keys)
        # The client never decodes replies (decode_responses=False): values are bytes.
        blobs = cast(list[bytes | None], pipe.mget(keys))
        present, values, filled = _encode_present(encoder, users, blobs, translations)
        if not present:
            return 0
        pipe.multi()
        keys = [embedding_key(encoder.version, u) for u, _ in present]
        pipe.mset(dict(zip(keys, values, strict=True)))
        if filled:
            pipe.mset(filled)
        pipe.execute()
    return len(present)


def _try_write_per_slot(
    client: redis.Redis,
    encoder: Encoder,
    users: Sequence[str],
    translations: Mapping[str, list[CatalogTranslation]],
) -> tuple[int, list[str]]:
    """:func:`_try_write` on a cluster: one compare-and-set per slot on the users' states.

    Returns the users written and the users whose slot saw a state change meanwhile.
    """
    blobs = cluster.mget(client, [state_key(u) for u in users])
    present, values, filled = _encode_present(encoder, users, blobs, translations)
    rows = cluster.group_by_slot(range(len(present)), lambda i: state_key(present[i][0]))
    groups = []
    for members in rows.values():
        group = cluster.GuardedWrite({state_key(present[i][0]): present[i][1] for i in members})
        for i in members:
            user = present[i][0]
            group.writes[embedding_key(encoder.version, user)] = values[i]
            if state_key(user) in filled:
                group.writes[state_key(user)] = filled[state_key(user)]
        groups.append(group)
    written, conflicted = 0, []
    done_per_slot = cluster.write_if_unchanged(client, groups)
    for members, done in zip(rows.values(), done_per_slot, strict=True):
        if done:
            written += len(members)
        else:
            conflicted += [present[i][0] for i in members]
    return written, conflicted


def _touched_since(client: redis.Redis, since: float, known: set[str]) -> list[str]:
    """Users a refresher committed at or after ``since``, and users with a state the backfill
    did not see (created during it)."""
    store = EmbeddingStore(client)
    users = list(dict.fromkeys(store.iter_state_users()))
    late: list[str] = []
    for lo in range(0, len(users), READ_BATCH):
        chunk = users[lo : lo + READ_BATCH]
        metas = cluster.mget(client, [meta_key(u) for u in chunk])
        for user, raw in zip(chunk, metas, strict=True):
            if user not in known or decode_meta(raw)[0] >= since:
                late.append(user)
    return late


def _align_to_parent(client: redis.Redis, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Fit both kinds of map to the parent version and keep the better on held-out users.

    A missing parent or too few shared users is logged, not fatal: the version is usable
    without a map, only readers of the parent cannot ask for ``as=parent`` yet.
    """
    parent = manifest.get("parent_version")
    if not parent:
        return None
    version = manifest["version"]
    try:
        maps: list[AlignmentMap] = [align_versions(client, version, parent, kind) for kind in KINDS]
    except (AlignmentError, LookupError) as exc:
        log.warning("no alignment %s -> %s: %s", version, parent, exc)
        return None
    best = max(maps, key=lambda m: m.metrics["holdout_r2"])
    Registry(client).set_alignment(version, parent, best.to_fields())
    return {"kind": best.kind, **best.metrics}


def _batches(n: int, size: int, progress: bool, label: str) -> Iterable[tuple[int, int]]:
    bar = tqdm(total=n, desc=label, unit="user", disable=not progress, leave=False)
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        yield lo, hi
        bar.update(hi - lo)
    bar.close()
