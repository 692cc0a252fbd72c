"""HTTP clients for the embedding service, sync and async, pinned to one version.

Example:
    >>> client = EmbeddingClient("http://embeddings:8000", version="v3", api_key="...")
    >>> batch = client.fetch(["u1", "u2"])   # [2, dim] float32, NaN rows for missing users
    >>> client.info().pin                     # Pin(version='v3', dim=64, schema_hash='...')

Bulk reads go through ``POST /v1/embeddings:batch`` in chunks of at most ``batch_size`` ids
(the async client sends chunks concurrently), in the binary format: one float32 matrix per
chunk, no JSON floats to print and parse. A single user is read in the binary format too. Every
call retries 429, 503 and transport errors with backoff (:mod:`downstream_adapters.retry`).
Without a pinned ``version`` the server's active version is read, which changes under you when
a new version is promoted: pin one for anything that feeds a trained head.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Self

import httpx

from downstream_adapters.cache import EmbeddingCache, Entry
from downstream_adapters.retry import RetryPolicy
from downstream_adapters.wire import (
    OCTET_STREAM,
    Embeddings,
    Pin,
    VersionInfo,
    assemble,
    batch_body,
    batch_params,
    chunks,
    decode_binary,
    embedding_path,
    parse_binary_batch,
    raise_for_problem,
    with_idempotency_keys,
)

DEFAULT_BATCH_SIZE = 1000
"""The server's default ``ENCODER_BATCH_LIMIT``; more ids per request is a 413."""


class _Base:
    """Configuration and the cache logic both clients share."""

    def __init__(
        self,
        base_url: str,
        *,
        version: str | None = None,
        api_key: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache_ttl: float | None = None,
        cache_size: int = 100_000,
        retry: RetryPolicy | None = None,
        expect: Pin | None = None,
    ) -> None:
        if expect is not None and version not in (None, expect.version):
            raise ValueError(f"version {version!r} contradicts the expected pin {expect}")
        self.base_url = base_url.rstrip("/")
        self.version = expect.version if expect is not None else version
        self.batch_size = batch_size
        self.cache = EmbeddingCache(cache_ttl, cache_size) if cache_ttl else None
        self.retry = retry or RetryPolicy()
        self.expect = expect
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._info: VersionInfo | None = None

    def _cached(self, user_ids: Sequence[str]) -> tuple[dict[str, Entry], list[str]]:
        """Split ids into cache hits and ids to request (deduplicated, order kept)."""
        hits: dict[str, Entry] = {}
        wanted: list[str] = []
        for user in dict.fromkeys(user_ids):
            entry = self.cache.get(self.version, user) if self.cache and self.version else None
            if entry is None:
                wanted.append(user)
            else:
                hits[user] = entry
        return hits, wanted

    def _remember(self, version: str, found: Mapping[str, Entry]) -> None:
        if self.cache is not None and self.version is not None:
            self.cache.put_many(version, found.items())

    def _accept_info(self, info: VersionInfo) -> VersionInfo:
        if self.expect is not None:
            self.expect.check(info.pin)
        self._info = info
        return info


class EmbeddingClient(_Base):
    """Blocking client; use as a context manager or call :meth:`close`.

    Args:
        base_url: The service root, e.g. ``http://embeddings:8000``.
        version: Version to read; the active one when omitted.
        api_key: Sent as ``Authorization: Bearer``.
        batch_size: Ids per batch request; keep it at most the server's batch limit.
        cache_ttl: Seconds to keep fetched vectors in memory (pinned versions only); off if None.
        retry: Retry policy for 429, 503 and transport errors.
        expect: A pin (from a saved head); the first :meth:`info` refuses a server that differs.
        transport: An httpx transport, e.g. ``httpx.HTTPTransport(retries=2)``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in self.retry.sync():
            with attempt:
                response = self._http.request(method, path, **kwargs)
                raise_for_problem(response)
        return response

    def info(self, *, refresh: bool = False) -> VersionInfo:
        """The pinned (else active) version's manifest; checked against ``expect``."""
        if self._info is not None and not refresh:
            return self._info
        if self.version is None:
            listing = self._request("GET", "/v1/versions").json()
            version = listing["active"]
            manifest = next(m for m in listing["versions"] if m["version"] == version)
        else:
            manifest = self._request("GET", f"/v1/versions/{self.version}").json()
        return self._accept_info(VersionInfo.from_manifest(manifest))

    def get(self, user_id: str) -> Entry:
        """One user's ``(vector, updated_at)``, read in the binary format."""
        params = {"version": self.version} if self.version else None
        response = self._request(
            "GET", embedding_path(user_id), params=params, headers={"Accept": OCTET_STREAM}
        )
        return decode_binary(response, self.version)

    def fetch(self, user_ids: Sequence[str], *, updated_at: bool = False) -> Embeddings:
        """Vectors for ``user_ids`` in order; unknown users are NaN rows listed in ``missing``.

        ``updated_at=True`` also fetches each user's last update time (the server then reads
        twice the keys).
        """
        info = self.info()
        pin = info.pin
        hits, wanted = self._cached(user_ids)
        for chunk in chunks(wanted, self.batch_size):
            response = self._request(
                "POST",
                "/v1/embeddings:batch",
                json=batch_body(chunk, pin.version),
                params=batch_params(updated_at),
                headers={"Accept": OCTET_STREAM},
            )
            found = parse_binary_batch(response, chunk, pin.version, pin.dim, updated_at=updated_at)
            self._remember(pin.version, found)
            hits.update(found)
        return assemble(pin.version, user_ids, pin.dim, hits)

    def ingest(self, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Append events (the offline events-table fields, plus optional ``categories`` and
        ``profile``) in batches; returns ``{accepted, ids, refused}`` summed over batches, with
        ``refused[].index`` relative to ``events``. Needs a key with the ``ingest`` scope."""
        keyed = with_idempotency_keys(events)
        result: dict[str, Any] = {"accepted": 0, "ids": [], "refused": []}
        for offset in range(0, len(keyed), self.batch_size):
            body = {"events": keyed[offset : offset + self.batch_size]}
            _merge_ingest(result, self._request("POST", "/v1/events", json=body).json(), offset)
        return result


class AsyncEmbeddingClient(_Base):
    """The asyncio twin of :class:`EmbeddingClient`; batch chunks are fetched concurrently, at
    most ``concurrency`` at a time."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        concurrency: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport
        )
        self._slots = asyncio.Semaphore(concurrency)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async for attempt in self.retry.asynchronous():
            with attempt:
                async with self._slots:
                    response = await self._http.request(method, path, **kwargs)
                raise_for_problem(response)
        return response

    async def info(self, *, refresh: bool = False) -> VersionInfo:
        """The pinned (else active) version's manifest; checked against ``expect``."""
        if self._info is not None and not refresh:
            return self._info
        if self.version is None:
            listing = (await self._request("GET", "/v1/versions")).json()
            version = listing["active"]
            manifest = next(m for m in listing["versions"] if m["version"] == version)
        else:
            manifest = (await self._request("GET", f"/v1/versions/{self.version}")).json()
        return self._accept_info(VersionInfo.from_manifest(manifest))

    async def get(self, user_id: str) -> Entry:
        """One user's ``(vector, updated_at)``, read in the binary format."""
        params = {"version": self.version} if self.version else None
        response = await self._request(
            "GET", embedding_path(user_id), params=params, headers={"Accept": OCTET_STREAM}
        )
        return decode_binary(response, self.version)

    async def fetch(self, user_ids: Sequence[str], *, updated_at: bool = False) -> Embeddings:
        """See :meth:`EmbeddingClient.fetch`."""
        info = await self.info()
        pin = info.pin
        hits, wanted = self._cached(user_ids)

        async def one(chunk: list[str]) -> dict[str, Entry]:
            response = await self._request(
                "POST",
                "/v1/embeddings:batch",
                json=batch_body(chunk, pin.version),
                params=batch_params(updated_at),
                headers={"Accept": OCTET_STREAM},
            )
            found = parse_binary_batch(response, chunk, pin.version, pin.dim, updated_at=updated_at)
            self._remember(pin.version, found)
            return found

        for found in await asyncio.gather(*(one(c) for c in chunks(wanted, self.batch_size))):
            hits.update(found)
        return assemble(pin.version, user_ids, pin.dim, hits)

    async def ingest(self, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """See :meth:`EmbeddingClient.ingest`."""
        keyed = with_idempotency_keys(events)
        result: dict[str, Any] = {"accepted": 0, "ids": [], "refused": []}
        for offset in range(0, len(keyed), self.batch_size):
            body = {"events": keyed[offset : offset + self.batch_size]}
            answer = (await self._request("POST", "/v1/events", json=body)).json()
            _merge_ingest(result, answer, offset)
        return result


def _merge_ingest(total: dict[str, Any], answer: Mapping[str, Any], offset: int) -> None:
    total["accepted"] += answer["accepted"]
    total["ids"].extend(answer["ids"])
    total["refused"].extend({**r, "index": r["index"] + offset} for r in answer["refused"])
