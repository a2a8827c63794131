"""Postgres connections and migrations."""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

import psycopg
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
        check=_RecentlyUsedCheck(),
        open=True,
    )


class _RecentlyUsedCheck:
    """The pool's check of a connection before it hands it out (a broken one, after a Postgres restart
    say, is replaced instead of failing its caller), skipped for a connection handed out less than
    FRESH_SECONDS ago. The check is a round trip to Postgres: checking every time was a third of the
    API's busy time under 5000 long-polling clients. A connection that broke within that second fails
    one caller (a 503 at the API; the pool then discards it)."""

    FRESH_SECONDS = 1.0

    def __init__(self):
        self._handed_out: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __call__(self, conn: psycopg.Connection) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._handed_out.get(conn)
            self._handed_out[conn] = now
        if last is None or now - last >= self.FRESH_SECONDS:
            ConnectionPool.check_connection(conn)


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


def grant_app_role(database_url: str, role: str, password: str | None = None) -> None:
    """Make (or update) the least-privileged role the services connect as, on a migrated database.

    It may read and write rows of every table (no DDL on them: it cannot drop, alter or truncate them),
    use the sequences, and own `chunks` alone, because making a collection builds that collection's
    HNSW index on it (CREATE INDEX CONCURRENTLY needs the table's owner and CREATE on the schema). Migrations keep running as the owner
    role; run this after each migration, as the compose file's `migrate` service does."""
    from psycopg import sql

    ident = sql.Identifier(role)
    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        if password:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(password)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), ident))
        # CREATE on the schema: an index lives in its table's schema. It lets the role add objects of its
        # own, never alter or drop the owner's tables.
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("ALTER TABLE chunks OWNER TO {}").format(ident))
