"""Token streams: the text an engine generates, carried from the worker that runs a request to
whichever API process holds its client.

One Redis stream per request (``XADD``), not pub/sub: a reader that arrives after the first
tokens (the client connected late, or to another API process) still reads the stream from its
start. A stream expires ``STREAM_TTL_S`` after its last event and keeps about ``MAX_EVENTS``
entries. A request's last event is ``done``: its result is committed, read the record.

Streaming is best effort; Postgres stays the truth. A publisher never raises (a lost event
costs a reader only latency: the API falls back to the committed record), and while Redis is
unreachable it drops events for ``OUTAGE_PAUSE_S`` rather than stall the engine on each call.

In embedded mode (``memory://``) the API and the workers share one process, and an in-memory
hub stands in for Redis, shared by broker URL and key prefix as Celery's memory broker is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio
from redis.typing import EncodableT, FieldT

from core.settings import Settings
from tasks.broker_redis import async_redis_client, redis_client

log = logging.getLogger(__name__)

STREAM_TTL_S = 600
MAX_EVENTS = 100_000  # trimmed approximately: enough for max_tokens x n of any request
READ_COUNT = 1000  # events per read, at most
START = "0"  # the cursor of a stream's first event
OUTAGE_PAUSE_S = 5.0
REDIS_TIMEOUT_S = 2.0
_KEY = "inferq:tokens:"
_MEMORY_POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    index: int = 0  # choice index
    delta: str = ""  # new text since the previous event for this choice
    done: bool = False  # the request's result is committed (read the final record)


class StreamPublisher(Protocol):
    """The worker's side: sync, called from a worker thread."""

    def publish(self, events: Sequence[TokenEvent]) -> None:
        """Append events to their requests' streams: one round trip per call, never raises."""
        ...

    def close(self) -> None: ...


class StreamReader(Protocol):
    """The API's side: async, one per API process."""

    async def read(
        self, request_id: str, after: str, *, block_s: float
    ) -> tuple[list[TokenEvent], str]:
        """The events after cursor ``after`` (``START``: from the first), waiting up to
        ``block_s`` for one, and the cursor to pass next time."""
        ...

    async def aclose(self) -> None: ...


def stream_key(prefix: str, request_id: str) -> str:
    """A request's stream, under the broker key prefix (test sessions share one Redis)."""
    return f"{prefix}{_KEY}{request_id}"


def create_publisher(settings: Settings) -> StreamPublisher:
    """Redis for a ``redis://`` broker, the process's memory hub for ``memory://``."""
    if settings.embedded:
        return memory_hub(settings)
    client = redis_client(
        settings, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    return RedisPublisher(client, settings.broker_key_prefix)


def create_reader(settings: Settings) -> StreamReader:
    """Create it in the event loop that reads (it opens connections lazily, on that loop)."""
    if settings.embedded:
        return memory_hub(settings)
    # No socket timeout: a blocking read waits on the server for up to its block_s.
    client = async_redis_client(settings, socket_connect_timeout=REDIS_TIMEOUT_S)
    return RedisReader(client, settings.broker_key_prefix)


class RedisPublisher:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._paused_until = 0.0

    def publish(self, events: Sequence[TokenEvent]) -> None:
        if not events or time.monotonic() < self._paused_until:
            return
        pipe = self._client.pipeline(transaction=False)
        keys: dict[str, None] = {}
        for event in events:
            key = stream_key(self._prefix, event.request_id)
            pipe.xadd(key, _encode(event), maxlen=MAX_EVENTS, approximate=True)
            keys[key] = None
        for key in keys:
            pipe.expire(key, STREAM_TTL_S)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._paused_until = time.monotonic() + OUTAGE_PAUSE_S
            log.warning("token stream: dropped %d events (%s)", len(events), exc)

    def close(self) -> None:
        self._client.close()


class RedisReader:
    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    async def read(
        self, request_id: str, after: str, *, block_s: float
    ) -> tuple[list[TokenEvent], str]:
        key = stream_key(self._prefix, request_id)
        block_ms = max(1, int(block_s * 1000))  # 0 would block for ever
        reply: Any = await self._client.xread({key: after}, count=READ_COUNT, block=block_ms)
        entries = _entries(reply)
        if not entries:
            return [], after
        last_id = entries[-1][0]
        cursor = last_id.decode() if isinstance(last_id, bytes) else str(last_id)
        return [_decode(request_id, fields) for _id, fields in entries], cursor

    async def aclose(self) -> None:
        await self._client.aclose()


def _encode(event: TokenEvent) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {"i": event.index, "d": event.delta}
    if event.done:
        fields["done"] = 1
    return fields


def _decode(request_id: str, fields: dict[bytes, bytes]) -> TokenEvent:
    return TokenEvent(
        request_id,
        index=int(fields.get(b"i", b"0")),
        delta=fields.get(b"d", b"").decode(),
        done=b"done" in fields,
    )


def _entries(reply: Any) -> list[Any]:
    """XREAD's entries for one key: RESP2 answers a list of pairs, RESP3 a mapping."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values()))[0] if reply else [])
    return list(reply[0][1])


class MemoryHub:
    """Both sides in one process (embedded mode): events kept in lists, read by polling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[float, list[TokenEvent]]] = {}

    def publish(self, events: Sequence[TokenEvent]) -> None:
        now = time.monotonic()
        with self._lock:
            for event in events:
                _touched, stream = self._streams.get(event.request_id, (now, []))
                stream.append(event)
                self._streams[event.request_id] = (now, stream)
            stale = [k for k, (at, _) in self._streams.items() if now - at > STREAM_TTL_S]
            for key in stale:
                del self._streams[key]

    def close(self) -> None:
        """Shared by the process's publishers and readers: nothing to release."""

    async def read(
        self, request_id: str, after: str, *, block_s: float
    ) -> tuple[list[TokenEvent], str]:
        start = int(after)
        deadline = time.monotonic() + block_s
        while True:
            with self._lock:
                _at, stream = self._streams.get(request_id, (0.0, []))
                events = stream[start : start + READ_COUNT]
            if events or time.monotonic() >= deadline:
                return events, str(start + len(events))
            await asyncio.sleep(_MEMORY_POLL_S)

    async def aclose(self) -> None:
        """Nothing to release (see :meth:`close`)."""


_hubs: dict[str, MemoryHub] = {}
_hubs_lock = threading.Lock()


def memory_hub(settings: Settings) -> MemoryHub:
    """The process's hub for this broker: the one the in-process workers publish to."""
    with _hubs_lock:
        return _hubs.setdefault(f"{settings.broker_url}|{settings.broker_key_prefix}", MemoryHub())
