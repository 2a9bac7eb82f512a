"""The schema's revisions: every CLI command that reads the database says, on an empty or
older one, to run `inferq migrate` (instead of an SQL traceback), and this session's
migrations go down and up again cleanly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from inferq.cli import main
from storage.migrate import alembic_config, upgrade
from tests.conftest import PG_URL


@contextmanager
def bare_database() -> Iterator[str]:
    """A new, empty Postgres database beside the test one, dropped on exit."""
    admin = make_url(PG_URL)
    name = f"inferq_bare_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(url: str, *args: str) -> tuple[int, str]:
    env = {"INFERQ_DATABASE_URL": url, "INFERQ_BROKER_URL": "redis://127.0.0.1:6379/11"}
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


COMMANDS = [
    ("report",),
    ("tenant", "create", "acme"),
    ("tenant", "key", "list", "acme"),
    ("tenant", "budget", "acme"),
    ("api", "--port", "1"),  # refused before it would serve
    ("prune", "--older-than", "30d"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_an_unmigrated_database_is_named_with_what_to_do(args: tuple[str, ...]) -> None:
    with bare_database() as url:
        code, output = run(url, *args)
    assert code == 1, output
    assert "has no inferq schema: run `inferq migrate` first" in output, output
    assert "Traceback" not in output


def test_an_older_schema_says_which_revisions_and_migrate_brings_it_to_head() -> None:
    with bare_database() as url:
        upgrade(url, "0013")
        code, output = run(url, "report")
        assert code == 1 and "is at schema revision 0013, this inferq needs" in output, output
        assert run(url, "migrate")[0] == 0
        code, output = run(url, "tenant", "create", "acme")
        assert code == 0, output
        # The newest migrations undo and redo cleanly, with a tenant's rows in place.
        command.downgrade(alembic_config(url), "0013")
        upgrade(url)
        assert run(url, "report")[0] == 0
