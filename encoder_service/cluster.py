"""Multi-key commands that work on one server and on a Redis Cluster alike.

A cluster refuses a multi-key command (MGET, MSET, a transaction) whose keys hash to different
slots. A user's keys share the hash tag ``{<user_id>}``, so everything about one user is on one
slot, but a bulk read or write over many users is not: here it is split into one command per
slot, sent as one pipeline that redis-py's cluster client fans out to every node at once (the
asyncio client concurrently), and the replies come back in request order. On a single server
each helper is the plain command, unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

T = TypeVar("T")


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a cluster client (sync or asyncio)."""
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def slot_of(key: str | bytes) -> int:
    """The cluster slot of ``key`` (CRC16 of its hash tag, else of the whole key)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def group_by_slot(items: Iterable[T], key_of: Any) -> dict[int, list[T]]:
    """``items`` grouped by the slot of ``key_of(item)``, each group in input order."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(slot_of(key_of(item)), []).append(item)
    return groups


def mget(client: redis.Redis, keys: Sequence[str | bytes]) -> list[bytes | None]:
    """MGET over any keys: one MGET per slot on a cluster, values in ``keys`` order."""
    if not keys:
        return []
    if is_cluster(client):
        return cast(list[bytes | None], client.mget_nonatomic(keys))  # type: ignore[attr-defined]
    return cast(list[bytes | None], client.mget(keys))


def mset(client: redis.Redis, mapping: Mapping[Any, bytes]) -> None:
    """MSET over any keys: one MSET per slot on a cluster (not atomic across slots)."""
    if not mapping:
        return
    if is_cluster(client):
        client.mset_nonatomic(mapping)  # type: ignore[attr-defined]
    else:
        client.mset(mapping)


def unlink(client: redis.Redis, keys: Sequence[str | bytes]) -> int:
    """UNLINK any keys (the cluster client already splits it by slot); returns the count."""
    return int(client.unlink(*keys)) if keys else 0


async def mget_async(
    client: redis.asyncio.Redis, keys: Sequence[str | bytes]
) -> list[bytes | None]:
    """:func:`mget` over an asyncio client; the per-slot MGETs go to every node concurrently."""
    if not keys:
        return []
    if is_cluster(client):
        return cast(list[bytes | None], await client.mget_nonatomic(keys))  # type: ignore[attr-defined]
    return cast(list[bytes | None], await client.mget(keys))


def first_key(item: tuple[Hashable, ...]) -> Any:
    """The first element of a tuple, as a ``key_of`` for :func:`group_by_slot`."""
    return item[0]
