"""Settings for workers on many hosts: a Redis Sentinel broker URL becomes the options Celery
and our own Redis clients need, and a database URL for PgBouncer in transaction mode turns
psycopg's prepared statements off. Offline, but for one real Postgres connection."""

from __future__ import annotations

import pytest
import redis.asyncio.sentinel
import redis.sentinel
from pydantic import ValidationError
from sqlalchemy import text

from core.settings import Settings
from router import load_config
from router.config import RouterConfig
from storage.db import make_engine
from tasks.app import create_celery
from tasks.broker_redis import async_redis_client, redis_client, uses_redis
from tests.conftest import PG_URL, TEST_CONFIG

SENTINELS = "sentinel://:master-pw@s1.example:26379/3;sentinel://:master-pw@s2.example:26380/3"


def _sentinel_settings(**values: object) -> Settings:
    return Settings(
        database_url="sqlite://",
        broker_url=SENTINELS,
        broker_master_name="inferq",
        **values,  # type: ignore[arg-type]
    )


def test_a_sentinel_url_needs_the_masters_name() -> None:
    with pytest.raises(ValidationError, match="INFERQ_BROKER_MASTER_NAME"):
        Settings(database_url="sqlite://", broker_url=SENTINELS)


def test_celery_asks_the_sentinels_for_the_named_master(router_config: RouterConfig) -> None:
    settings = _sentinel_settings(broker_sentinel_password="sentinel-pw", broker_key_prefix="p:")
    app = create_celery(settings, router_config)
    options = app.conf.broker_transport_options
    assert options["master_name"] == "inferq"
    assert options["sentinel_kwargs"] == {"password": "sentinel-pw"}
    assert options["global_keyprefix"] == "p:"  # what was there stays
    connection = app.connection_for_write()
    assert type(connection.transport).__name__ == "SentinelTransport"  # built, not connected
    assert len(connection.alt) == 2


def test_plain_redis_gets_no_sentinel_options(router_config: RouterConfig) -> None:
    settings = Settings(database_url="sqlite://", broker_url="redis://127.0.0.1:6379/0")
    options = create_celery(settings, router_config).conf.broker_transport_options
    assert "master_name" not in options and "sentinel_kwargs" not in options


def test_our_redis_clients_follow_the_sentinels_too() -> None:
    settings = _sentinel_settings(broker_sentinel_password="sentinel-pw")
    assert uses_redis(settings)  # breakers and token budgets stay shared, not per process
    for client, sentinel_pool in (
        (redis_client(settings, socket_timeout=2.0), redis.sentinel.SentinelConnectionPool),
        (async_redis_client(settings), redis.asyncio.sentinel.SentinelConnectionPool),
    ):
        pool = client.connection_pool
        assert isinstance(pool, sentinel_pool)
        assert pool.service_name == "inferq"
        assert pool.connection_kwargs["password"] == "master-pw"
        assert pool.connection_kwargs["db"] == 3
        nodes = pool.sentinel_manager.sentinels
        assert [n.connection_pool.connection_kwargs["host"] for n in nodes] == [
            "s1.example",
            "s2.example",
        ]
        assert [n.connection_pool.connection_kwargs["port"] for n in nodes] == [26379, 26380]
        assert {n.connection_pool.connection_kwargs["password"] for n in nodes} == {"sentinel-pw"}


@pytest.mark.parametrize(("query", "prepares"), [("", True), ("?prepare_threshold=none", False)])
def test_a_pgbouncer_url_turns_prepared_statements_off(query: str, prepares: bool) -> None:
    engine = make_engine(PG_URL + query)
    try:
        assert "prepare_threshold" not in engine.url.query  # libpq would refuse it
        with engine.connect() as conn:
            for _ in range(10):  # past psycopg's default threshold of 5 runs
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
            prepared = conn.execute(text("SELECT count(*) FROM pg_prepared_statements"))
            assert (prepared.scalar_one() > 0) is prepares
    finally:
        engine.dispose()


def test_a_bad_prepare_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="prepare_threshold"):
        make_engine(f"{PG_URL}?prepare_threshold=sometimes")


@pytest.fixture
def router_config() -> RouterConfig:
    return load_config(TEST_CONFIG)
