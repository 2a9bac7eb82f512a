"""Engines and sessions, made from settings in a lifecycle hook, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def normalise_url(url: str) -> str:
    """Use psycopg 3 for a bare ``postgresql://`` URL, as users usually write it."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine for ``url``.

    A Postgres URL may end in ``?prepare_threshold=none`` (psycopg's own option, which libpq
    does not know, so it is taken off the URL here): no server-side prepared statements, for a
    PgBouncer in transaction mode that does not track them (before 1.21, or with
    ``max_prepared_statements = 0``). A number prepares a statement after that many runs on a
    connection (psycopg's default: 5).
    """
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path. A connection broken by
    # a server restart invalidates the pool on first use instead.
    connect_args: dict[str, Any] = {}
    if "prepare_threshold" in parsed.query:
        connect_args["prepare_threshold"] = _threshold(parsed.query["prepare_threshold"])
        parsed = parsed.difference_update_query(["prepare_threshold"])
    return create_engine(
        parsed, pool_size=10, max_overflow=20, pool_recycle=1800, connect_args=connect_args
    )


def _threshold(value: str | tuple[str, ...]) -> int | None:
    text = value[-1] if isinstance(value, tuple) else value
    if text.strip().lower() in ("", "none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"prepare_threshold must be a number or 'none', not {text!r}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
