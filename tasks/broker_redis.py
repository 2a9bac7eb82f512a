"""The broker's Redis, for what inferq keeps there beside Celery's queues (token streams,
breakers, token budgets), plus the transport options Celery needs to reach it.

A ``redis://`` (or ``rediss://``) URL names one server. A ``sentinel://`` URL names the Redis
Sentinels watching a highly available one, as kombu writes it: ``sentinel://[:PASSWORD@]HOST:PORT
[/DB]`` per sentinel, joined by ``;``, with the master's name in ``broker_master_name``. The
password in the URL is the master's; ``broker_sentinel_password`` is the sentinels' own, when
they require one. Every client here asks the sentinels for the current master, so a failover
moves them all with Celery.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from core.settings import Settings

REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://")
SENTINEL_PORT = 26379


def uses_redis(settings: Settings) -> bool:
    """Whether the broker is Redis, directly or through Sentinel."""
    return settings.broker_url.startswith(REDIS_SCHEMES)


def transport_options(settings: Settings) -> dict[str, Any]:
    """What kombu's Sentinel transport needs beyond the URL (nothing for plain Redis)."""
    if not settings.broker_url.startswith("sentinel://"):
        return {}
    options: dict[str, Any] = {"master_name": settings.broker_master_name}
    if settings.broker_sentinel_password:
        options["sentinel_kwargs"] = {"password": settings.broker_sentinel_password}
    return options


def redis_client(settings: Settings, **options: Any) -> redis.Redis:
    """A client of the broker's Redis (its current master behind Sentinel).

    Args:
        settings: the broker URL, and with Sentinel the master's name.
        options: connection options such as ``socket_timeout``.
    """
    if not settings.broker_url.startswith("sentinel://"):
        return redis.Redis.from_url(settings.broker_url, **options)
    nodes, master = _parse_sentinels(settings.broker_url)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        nodes, sentinel_kwargs=_sentinel_kwargs(settings, options), **master, **options
    )
    client = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.broker_master_name, redis_class=redis.Redis
    )
    return cast(redis.Redis, client)


def async_redis_client(settings: Settings, **options: Any) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`redis_client`; it connects lazily, on the loop that uses it."""
    if not settings.broker_url.startswith("sentinel://"):
        return redis.asyncio.Redis.from_url(settings.broker_url, **options)
    nodes, master = _parse_sentinels(settings.broker_url)
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        nodes, sentinel_kwargs=_sentinel_kwargs(settings, options), **master, **options
    )
    client = sentinel.master_for(settings.broker_master_name, redis_class=redis.asyncio.Redis)
    return cast(redis.asyncio.Redis, client)


def _parse_sentinels(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels' addresses, and the master's credentials and database (from the first
    URL, as kombu reads them)."""
    parts = [urlsplit(part) for part in url.split(";") if part.strip()]
    nodes = [(p.hostname or "localhost", p.port or SENTINEL_PORT) for p in parts]
    first = parts[0]
    master: dict[str, Any] = {"db": int(first.path.strip("/") or 0)}
    if first.username:
        master["username"] = unquote(first.username)
    if first.password:
        master["password"] = unquote(first.password)
    return nodes, master


def _sentinel_kwargs(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    """Options for the connections to the sentinels themselves: the same timeouts, and their
    own password if they have one."""
    kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    if settings.broker_sentinel_password:
        kwargs["password"] = settings.broker_sentinel_password
    return kwargs
