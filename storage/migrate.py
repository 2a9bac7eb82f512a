"""Run Alembic migrations against the configured database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine, make_url

from storage.db import normalise_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser treats % as interpolation; escape it in passwords.
    config.set_main_option("sqlalchemy.url", normalise_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


class SchemaNotCurrent(RuntimeError):
    """The database's schema is not the one this code was written for."""


def check_current(engine: Engine) -> None:
    """Refuse to work on a database that ``inferq migrate`` has not brought to this code's
    revision: an API or worker on an empty or older schema would fail each request with an
    SQL error instead of saying once what to do.

    Raises:
        SchemaNotCurrent: naming the database, its revision and the one needed.
    """
    url = engine.url.render_as_string(hide_password=True)
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return
    if current is None:
        raise SchemaNotCurrent(f"database {url} has no inferq schema: run `inferq migrate` first")
    raise SchemaNotCurrent(
        f"database {url} is at schema revision {current}, this inferq needs {head}: "
        "run `inferq migrate` (with this version of inferq)"
    )


@contextmanager
def scratch_database(admin_url: str, prefix: str = "inferq_scratch") -> Iterator[str]:
    """A new Postgres database beside ``admin_url``'s, migrated to head, dropped on exit
    (for tests and benchmarks that need one of their own).

    Raises:
        psycopg.OperationalError: Postgres is not reachable at ``admin_url``.
    """
    admin = make_url(normalise_url(admin_url))
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    plain = admin.set(drivername="postgresql").difference_update_query(["prepare_threshold"])
    conninfo = plain.render_as_string(hide_password=False)  # libpq knows no prepare_threshold
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
