"""Many rows in one go: ``COPY`` on Postgres, an executemany ``INSERT`` elsewhere.

The bulk path inserts thousands of requests a second and a ledger row per attempt. An
executemany ``INSERT`` is one statement per row on the server (parsed, planned, executed)
and a bind per value on the client; ``COPY`` streams the rows as text in one command. Values
go through each column type's own bind processing first (a JSON column's serializer, an
enum's value), so what is stored is what the ``INSERT`` would have stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import psycopg
from sqlalchemy import FromClause, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session


def insert_rows(session: Session, table: FromClause, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys, column names) into ``table``.

    Raises:
        sqlalchemy.exc.DBAPIError: as the ``INSERT`` would (an ``IntegrityError`` for a
            duplicate key, an ``OperationalError`` when the server went away, ...).
    """
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        session.execute(insert(table), list(rows))
        return
    names = list(rows[0])
    defaults = _python_defaults(table, names)
    if defaults:  # an INSERT fills these in; COPY knows only the server's defaults
        rows = [{**row, **{name: make() for name, make in defaults.items()}} for row in rows]
        names += list(defaults)
    dialect = connection.dialect
    processors: list[Callable[[Any], Any] | None] = [
        table.c[name].type._cached_bind_processor(dialect) for name in names
    ]
    columns = ", ".join(dialect.identifier_preparer.quote(name) for name in names)
    statement = f"COPY {dialect.identifier_preparer.format_table(table)} ({columns}) FROM STDIN"
    raw = connection.connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(
                    [
                        row[name] if process is None else process(row[name])
                        for name, process in zip(names, processors, strict=True)
                    ]
                )
    except psycopg.Error as exc:  # as SQLAlchemy would raise it, so callers catch one kind
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc


def _python_defaults(table: FromClause, names: list[str]) -> dict[str, Callable[[], Any]]:
    """The columns missing from the rows that have a client-side default, and a maker each."""
    makers: dict[str, Callable[[], Any]] = {}
    for column in table.c:
        default = column.default
        if column.name in names or default is None or column.server_default is not None:
            continue
        arg: Any = getattr(default, "arg", None)
        if default.is_scalar:
            makers[column.name] = partial(_same, arg)
        elif default.is_callable:
            makers[column.name] = partial(arg, None)  # SQLAlchemy's wrapper takes a context
    return makers


def _same(value: Any) -> Any:
    return value
