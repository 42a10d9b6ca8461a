"""Alembic environment: migrate the connection `amk_farm.db.upgrade` hands in (inside its
transaction), or, run by the `alembic` tool, the database of AMK_DB_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from amk_farm import config, db


def run() -> None:
    conn = context.config.attributes.get("connection")
    if conn is None:  # the alembic command line
        url = context.config.get_main_option("sqlalchemy.url") or config.load().db_url
        with db.create(url).begin() as own:
            _migrate(own)
    else:
        _migrate(conn)


def _migrate(conn: Connection) -> None:
    context.configure(
        connection=conn,
        target_metadata=db.Base.metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; use `amk-farm db upgrade`")
run()
