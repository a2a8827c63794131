"""Postgres connections and migrations."""

from __future__ import annotations

from pathlib import Path

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_pool(database_url: str, *, min_size: int = 1, max_size: int = 10, name: str = "switchyard",
              timeout: float = 30.0) -> ConnectionPool:
    """A connection pool whose rows come back as dicts. Open it after fork (gunicorn, Celery).

    `timeout` bounds the wait for a connection: while Postgres is down, callers get PoolTimeout after
    that long (the API answers 503) instead of hanging."""
    return ConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        kwargs={"row_factory": dict_row, "autocommit": True, "connect_timeout": 5},
        name=name,
        check=ConnectionPool.check_connection,
        open=True,
    )


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver from the URL scheme; `postgresql+psycopg` selects psycopg 3.
    scheme, rest = database_url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else database_url


def migrate(database_url: str, *, log=print) -> list[str]:
    """Apply every pending migration in `migrations/` with yoyo; return the ids applied."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    applied = [m.id for m in pending]
    log(f"migrations: applied {applied or 'nothing (up to date)'}")
    return applied
