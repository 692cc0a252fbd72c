"""One pipelined connection for the API's single-user reads.

redis-py's asyncio client spends about 100 µs of Python on every command: the pool checkout,
packing, the retry wrapper and the connection classes' reply handling. With a single request in
flight that was half of everything a single-user read cost the API, and requests arriving one
at a time (the usual case below saturation) share nothing that would spread it. Here every MGET
is written to one connection the moment it is asked for, without waiting for earlier answers;
Redis answers a connection's commands in the order they arrived, so hiredis parses the replies
and each one resolves the oldest waiting caller.

Plain TCP and Unix-socket servers only: for TLS and for clusters,
:meth:`PipelinedConnection.for_client` returns None and the reads stay on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from encoder_service.redis_connection import (
    CONNECT_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    reconnect_retry,
)

if HIREDIS_AVAILABLE:
    import hiredis

Reply = Any


class _ReplyProtocol(asyncio.Protocol):
    """Matches replies to callers first in, first out; fails them all if the link drops."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if future.done():  # its caller gave up; the reply still had to be consumed
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(redis.exceptions.ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = redis.exceptions.ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, packed: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(packed)
        return future


class PipelinedConnection:
    """``await conn.mget(keys)`` like ``client.mget(keys)``, over one shared, pipelined link.

    The link is opened on first use and again after it drops; connection failures are retried
    with the same backoff as the redis-py clients, and a reply slower than ``timeout`` closes
    the link (its callers get ``redis.exceptions.TimeoutError``), so one hung server cannot
    hold every request of the API for ever.
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float,
        connect_timeout: float,
        retry: Retry,
    ) -> None:
        self._path = path
        self._host = host or "localhost"
        self._port = port
        self._handshake = [
            cmd
            for cmd in (
                ("AUTH", *([username] if username else []), password) if password else None,
                ("SELECT", str(db)) if db else None,
            )
            if cmd
        ]
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._retry = retry
        self._protocol: _ReplyProtocol | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def for_client(cls, client: redis.asyncio.Redis) -> PipelinedConnection | None:
        """One for the server ``client`` talks to, with its credentials and timeouts; None
        when hiredis is missing or the client uses TLS or a cluster."""
        pool = getattr(client, "connection_pool", None)
        if not HIREDIS_AVAILABLE or pool is None:
            return None
        kwargs = pool.connection_kwargs
        if pool.connection_class is UnixDomainSocketConnection:
            address: dict[str, Any] = {"path": kwargs["path"]}
        elif issubclass(pool.connection_class, Connection) and not issubclass(
            pool.connection_class, SSLConnection
        ):
            address = {"host": kwargs.get("host", "localhost"), "port": kwargs.get("port", 6379)}
        else:
            return None
        return cls(
            **address,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            db=int(kwargs.get("db") or 0),
            timeout=kwargs.get("socket_timeout") or SOCKET_TIMEOUT_S,
            connect_timeout=kwargs.get("socket_connect_timeout") or CONNECT_TIMEOUT_S,
            retry=reconnect_retry(),
        )

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        # The retry wrapper costs a few µs a call: taken only once a call has failed.
        try:
            return await self._call(("MGET", *keys))
        except redis.exceptions.ConnectionError:
            return await self._retry.call_with_retry(
                lambda: self._call(("MGET", *keys)), self._drop
            )

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _call(self, command: tuple[str, ...]) -> Reply:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        future = protocol.send(_pack(command))
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            await self.aclose()
            raise redis.exceptions.TimeoutError(
                f"no reply from Redis within {self._timeout:g} s"
            ) from None

    async def _connect(self) -> _ReplyProtocol:
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol  # another caller connected meanwhile
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    if self._path:
                        _, protocol = await loop.create_unix_connection(_ReplyProtocol, self._path)
                    else:
                        _, protocol = await loop.create_connection(
                            _ReplyProtocol, self._host, self._port
                        )
            except (OSError, TimeoutError) as exc:
                raise redis.exceptions.ConnectionError(
                    f"cannot connect to Redis at {self._describe()}: {exc or 'timed out'}"
                ) from exc
            try:
                async with asyncio.timeout(self._timeout):
                    for command in self._handshake:
                        await protocol.send(_pack(command))
            except BaseException as exc:
                if protocol.transport is not None:
                    protocol.transport.close()
                if isinstance(exc, TimeoutError):
                    raise redis.exceptions.TimeoutError("Redis did not answer AUTH/SELECT") from exc
                raise
            self._protocol = protocol
            return protocol

    async def _drop(self, error: Exception) -> None:
        await self.aclose()

    def _describe(self) -> str:
        return self._path or f"{self._host}:{self._port}"


def _pack(command: tuple[str, ...]) -> bytes:
    # hiredis's stub types the argument as a one-element tuple; any tuple of str is accepted.
    return hiredis.pack_command(command)  # type: ignore[arg-type]
