"""API keys over real processes: rotation with two valid keys, revocation within the key
cache's TTL, listings without secrets, identifiers that are no part of a secret, a flood of
made-up bearer tokens that does not reach Postgres once per token, and /metrics behind a token.

Database lookups are counted by Postgres itself: the scans of ``api_keys`` recorded in
``pg_stat_user_tables`` for a database only the flooded API uses, read after that API has
stopped (a backend flushes its statistics when it exits).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import column, insert, select, table
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from storage.db import make_engine, make_sessionmaker, normalise_url
from storage.migrate import upgrade
from storage.tables import ApiKey, Tenant
from storage.tenants import create_tenant, hash_key, tenant_for_key
from tests.conftest import PG_URL, service_env, start_api, stop, wait_for

CACHE_TTL_S = 2
METRICS_TOKEN = f"metrics-{uuid.uuid4().hex}"
IDENTIFIER = re.compile(r"iq_[0-9a-f]{12}")


@contextmanager
def fresh_database(revision: str = "head") -> Iterator[str]:
    """A database of its own, migrated to ``revision``, dropped afterwards."""
    admin = psycopg.conninfo.make_conninfo(_plain(PG_URL))
    name = f"inferq_keys_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = normalise_url(PG_URL).rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url, revision)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _plain(url: str) -> str:
    return re.sub(r"^postgresql\+\w+://", "postgresql://", normalise_url(url))


def api_env(settings: Settings, database_url: str, **extra: str) -> dict[str, str]:
    return {
        **service_env(settings),
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_AUTH_CACHE_TTL_S": str(CACHE_TTL_S),
        "INFERQ_RECONCILER": "false",
        **extra,
    }


@pytest.fixture(scope="module")
def keys_api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API with a short key cache and a metrics token, on the session's database."""
    env = api_env(settings, settings.database_url, INFERQ_METRICS_TOKEN=METRICS_TOKEN)
    process, url = start_api(env, tmp_path_factory.mktemp("keys"), "keys-api")
    yield url
    stop(process)


def inferq(settings: Settings, *args: str) -> list[str]:
    """Run the real `inferq` command; its output lines."""
    done = subprocess.run(
        [sys.executable, "-m", "inferq.cli", *args],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def status_with(url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(f"{url}/v1/models", headers=headers, timeout=30).status_code


def test_a_second_key_works_beside_the_first(settings: Settings, keys_api: str) -> None:
    name = f"rotating-{uuid.uuid4().hex[:8]}"
    first = inferq(settings, "tenant", "create", name)[-1]
    second = inferq(settings, "tenant", "key", "create", name)[-1]
    assert first != second
    assert status_with(keys_api, first) == 200
    assert status_with(keys_api, second) == 200


def test_a_revoked_key_stops_working_within_the_cache_ttl(
    settings: Settings, keys_api: str
) -> None:
    name = f"revoking-{uuid.uuid4().hex[:8]}"
    old = inferq(settings, "tenant", "create", name)[-1]
    new = inferq(settings, "tenant", "key", "create", name)[-1]
    assert status_with(keys_api, old) == 200  # now cached by the API
    revoked = inferq(settings, "tenant", "key", "revoke", old[:15])
    assert revoked[-1].startswith(f"revoked {old[:15]}")
    wait_for(
        lambda: status_with(keys_api, old) == 401,
        timeout=CACHE_TTL_S + 60,
        what="the revoked key to be refused once the API's cache entry expired",
    )
    assert status_with(keys_api, new) == 200
    listed = "\n".join(inferq(settings, "tenant", "key", "list", name))
    old_row = next(line for line in listed.splitlines() if line.split()[1] == old[:15])
    assert old_row.split()[-1] != "-", "the revoked key shows when it was revoked"


def test_revoke_by_id_and_the_listing_shows_no_secret(settings: Settings) -> None:
    name = f"listing-{uuid.uuid4().hex[:8]}"
    keys = [inferq(settings, "tenant", "create", name)[-1]]
    keys.append(inferq(settings, "tenant", "key", "create", name)[-1])
    lines = inferq(settings, "tenant", "key", "list", name)
    assert lines[0].split() == ["id", "prefix", "created", "revoked"]
    rows = [line.split() for line in lines[1:]]
    assert sorted(row[1] for row in rows) == sorted(key[:15] for key in keys)
    listing = "\n".join(lines)
    for key in keys:
        secret = key[16:]
        assert not any(secret[i : i + 6] in listing for i in range(len(secret) - 5))
    inferq(settings, "tenant", "key", "revoke", rows[0][0])
    listed = inferq(settings, "tenant", "key", "list", name)[1:]
    after = {line.split()[0]: line.split()[-1] for line in listed}
    assert after[rows[0][0]] != "-" and after[rows[1][0]] == "-"


def test_the_stored_prefix_is_an_identifier_not_part_of_the_secret(
    api_key: str, sessions: sessionmaker[Session]
) -> None:
    with sessions() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(api_key)))
    assert row is not None
    assert IDENTIFIER.fullmatch(row.prefix), row.prefix
    prefix, secret = api_key[:15], api_key[16:]
    assert api_key == f"{row.prefix}_{secret}" and prefix == row.prefix
    assert len(secret) == 43, "256 random bits after the identifier"
    stored = " ".join(str(getattr(row, c.key)) for c in ApiKey.__table__.columns)
    assert not any(secret[i : i + 4] in stored for i in range(len(secret) - 3)), stored


def test_keys_issued_before_identifiers_keep_working() -> None:
    legacy = "iq_" + secrets.token_urlsafe(32)
    with fresh_database("0009") as url:
        engine = make_engine(url)
        try:
            with make_sessionmaker(engine).begin() as session:
                tenant = Tenant(name="legacy")
                session.add(tenant)
                session.flush()
                # As 0009 had it: no revoked_at, the key's first ten characters as prefix.
                columns = ("id", "tenant_id", "key_hash", "prefix", "created_at")
                old_table = table("api_keys", *(column(name) for name in columns))
                session.execute(
                    insert(old_table).values(
                        id=uuid.uuid4(),
                        tenant_id=tenant.id,
                        key_hash=hash_key(legacy),
                        prefix=legacy[:10],
                        created_at=tenant.created_at,
                    )
                )
            upgrade(url)
            with make_sessionmaker(engine)() as session:
                found = tenant_for_key(session, legacy)
                prefix = session.scalar(select(ApiKey.prefix))
        finally:
            engine.dispose()
    assert found is not None and found.name == "legacy"
    assert prefix is not None and IDENTIFIER.fullmatch(prefix)
    assert legacy[3:10] not in prefix, "the stored prefix carried secret characters"


def test_a_flood_of_bad_tokens_does_not_reach_postgres_each_time(
    settings: Settings, tmp_path: Path
) -> None:
    """500 made-up tokens, each shaped like a real key and each different (so no cache can
    answer them), from one address. A key the API resolved before keeps working throughout."""
    with fresh_database() as url:
        engine = make_engine(url)
        try:
            with make_sessionmaker(engine).begin() as session:
                _tenant, good = create_tenant(session, "flooded")
        finally:
            engine.dispose()
        process, api = start_api(api_env(settings, url), tmp_path, "flood-api")
        try:
            assert status_with(api, good) == 200
            answers: list[int] = []
            began = time.monotonic()
            with httpx.Client(base_url=api, timeout=30) as client:
                for _ in range(500):
                    made_up = f"iq_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
                    headers = {"Authorization": f"Bearer {made_up}"}
                    answers.append(client.get("/v1/models", headers=headers).status_code)
            assert set(answers) <= {401, 429} and 429 in answers
            # Its entry expired during the flood (TTL 2 s): looked up again, unthrottled.
            assert status_with(api, good) == 200, "a known key is not throttled"
            flood_s = time.monotonic() - began
        finally:
            stop(process)
        scans = _api_key_scans_once_idle(url)
    # The throttle's own bound (the defaults: a burst of 20, then 2 a second), plus the good
    # key's lookups and the tenant's creation: however slow the machine, far below 500.
    allowed = 20 + 2 * flood_s + 20
    print(f"api_keys scans for 500 made-up tokens: {scans} in {flood_s:.1f}s")
    assert scans <= allowed, f"{scans} lookups of api_keys for 500 made-up tokens"


def _api_key_scans_once_idle(url: str) -> int:
    """Scans of api_keys, after every other backend on the database has exited (and so has
    flushed its statistics)."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(_plain(url), autocommit=True) as conn:

        def alone() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()
            return row is not None and row[0] == 0

        wait_for(alone, timeout=60, what="the API's database connections to close")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables"
            " WHERE relname = 'api_keys'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_metrics_need_the_token_when_one_is_set(keys_api: str) -> None:
    assert httpx.get(f"{keys_api}/metrics", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(f"{keys_api}/metrics", headers=wrong, timeout=30).status_code == 401
    right = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    response = httpx.get(f"{keys_api}/metrics", headers=right, timeout=30)
    assert response.status_code == 200 and "inferq_queue_messages" in response.text
