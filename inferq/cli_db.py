"""The database a CLI command works on: reachable and at this code's schema revision, or a
one-line error saying what to do (instead of an SQL traceback on the first query)."""

from __future__ import annotations

import logging

import click
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from core.settings import Settings


def database(settings: Settings) -> Engine:
    """An engine for ``settings.database_url`` once its schema is current (dispose it)."""
    alembic = logging.getLogger("alembic")
    level = alembic.level
    alembic.setLevel(logging.WARNING)  # its set-up lines are for `inferq migrate`, not here
    from storage.db import make_engine
    from storage.migrate import SchemaNotCurrent, check_current

    engine = make_engine(settings.database_url)
    try:
        check_current(engine)
    except SchemaNotCurrent as exc:
        engine.dispose()
        raise click.ClickException(str(exc)) from exc
    except OperationalError as exc:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise click.ClickException(f"cannot reach database {where}: {reason}") from exc
    finally:
        alembic.setLevel(level)
    return engine
