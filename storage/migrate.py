"""Run Alembic migrations against the configured database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

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
