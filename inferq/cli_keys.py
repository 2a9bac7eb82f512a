"""`inferq tenant key create|list|revoke`: a tenant's API keys, straight in the database.

Rotation without downtime: create a second key, move clients to it, revoke the first. Both
work in between; a revoked key is refused once API processes' key caches expire
(``INFERQ_AUTH_CACHE_TTL_S``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import click
from sqlalchemy.orm import Session

from core.settings import Settings

pass_settings = click.make_pass_decorator(Settings)


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """One transaction, committed on success; lookup failures become CLI errors."""
    from storage.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            yield session
    except LookupError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    finally:
        engine.dispose()


@click.group("key")
def key_group() -> None:
    """Create, list and revoke a tenant's API keys (several may be valid at once)."""


@key_group.command("create")
@click.argument("tenant")
@pass_settings
def key_create(settings: Settings, tenant: str) -> None:
    """Add a key to TENANT (name or id) and print it on the last line; other keys stay valid."""
    from storage.tenants import find_tenant, issue_key

    with _session(settings) as session:
        owner = find_tenant(session, tenant)
        key = issue_key(session, owner)
        name = owner.name
    click.echo(f"new API key for tenant {name}, shown once:")
    click.echo(key)


@key_group.command("list")
@click.argument("tenant")
@pass_settings
def key_list(settings: Settings, tenant: str) -> None:
    """TENANT's keys: id, prefix, created, revoked. The secrets are not stored, so never shown."""
    from storage.tenants import find_tenant, list_keys

    with _session(settings) as session:
        rows = list_keys(session, find_tenant(session, tenant))
        lines = [
            f"{row.id}  {row.prefix:<16} {_when(row.created_at)}  {_when(row.revoked_at)}"
            for row in rows
        ]
    click.echo(f"{'id':<36}  {'prefix':<16} {'created':<25}  revoked")
    for line in lines:
        click.echo(line)


def _when(moment: datetime | None) -> str:
    from storage.tables import as_utc

    return as_utc(moment).astimezone(UTC).isoformat(timespec="seconds") if moment else "-"


@key_group.command("revoke")
@click.argument("key")
@pass_settings
def key_revoke(settings: Settings, key: str) -> None:
    """Revoke KEY, given by its id or prefix (see `key list`)."""
    from storage.tenants import revoke_key

    with _session(settings) as session:
        row = revoke_key(session, key)
        prefix = row.prefix
    click.echo(
        f"revoked {prefix}; API processes may accept it for up to "
        f"{settings.auth_cache_ttl_s:g}s more (their key cache)"
    )
