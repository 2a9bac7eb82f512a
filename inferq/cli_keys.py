"""`inferq tenant key create|list|revoke`: a tenant's API keys, and `inferq tenant budget`: its
spending budget, straight in the database.

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
from inferq.cli_db import database

pass_settings = click.make_pass_decorator(Settings)


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """One transaction, committed on success; lookup failures become CLI errors."""
    from storage.db import make_sessionmaker

    engine = database(settings)
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


@click.command("budget")
@click.argument("tenant")
@click.option("--daily", type=float, help="Most the tenant may spend per UTC day.")
@click.option("--monthly", type=float, help="Most the tenant may spend per UTC month.")
@click.option("--clear", is_flag=True, help="Remove the budget: no spending limit.")
@pass_settings
def budget_command(
    settings: Settings, tenant: str, daily: float | None, monthly: float | None, clear: bool
) -> None:
    """Set, clear or (with no option) show TENANT's spending budget and its spend against it.

    Amounts are in the ledger's currency. Work that would take the day's or the month's spend
    (with what admitted work may still cost) past the budget is refused at submission (429).
    """
    from storage.budgets import clear_budget, find_budget_standing, set_budget
    from storage.tenants import find_tenant

    if clear and (daily is not None or monthly is not None):
        raise click.UsageError("--clear takes no --daily or --monthly")
    with _session(settings) as session:
        owner = find_tenant(session, tenant)
        if clear:
            had = clear_budget(session, owner)
            click.echo(f"tenant {owner.name}: " + ("budget cleared" if had else "had no budget"))
            return
        if daily is not None or monthly is not None:
            try:
                set_budget(session, owner, daily=daily, monthly=monthly)
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from exc
        states = find_budget_standing(session, owner)
        name = owner.name
    if not states:
        click.echo(f"tenant {name}: no budget")
        return
    from inferq.report_text import money, table
    from router.config import ConfigError, load_config

    try:
        currency = load_config(settings.config).currency
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = [["period", "budget", "spent", "reserved", "left", "resets (UTC)"]]
    for s in states:
        amounts = [money(v, currency) for v in (s.limit, s.spent, s.reserved, s.left)]
        rows.append([s.period, *amounts, _when(s.resets_at)])
    click.echo(f"tenant {name}")
    click.echo(table(rows))
