"""The Postgres pool's check of a connection before handing it out (tasks/db.py), on a real Postgres:
skipped for a connection in use a moment ago, done after a pause, and a connection that broke
meanwhile is replaced without its caller seeing it."""

from __future__ import annotations

import time

from psycopg_pool import ConnectionPool

from tasks.db import _RecentlyUsedCheck, make_pool


def test_a_connection_handed_out_a_moment_ago_is_not_checked_again(base_settings, monkeypatch):
    checks = []
    real = ConnectionPool.check_connection
    monkeypatch.setattr(ConnectionPool, "check_connection",
                        staticmethod(lambda conn: (checks.append(conn), real(conn))))
    with make_pool(base_settings.database_url, min_size=1, max_size=1, name="check-test") as pool:
        for _ in range(20):
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        assert len(checks) == 1  # the first hand-out only
        time.sleep(_RecentlyUsedCheck.FRESH_SECONDS + 0.1)
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert len(checks) == 2


def test_a_connection_broken_during_a_pause_is_replaced_before_it_is_handed_out(base_settings, db):
    with make_pool(base_settings.database_url, min_size=1, max_size=1, name="check-test") as pool:
        with pool.connection() as conn:
            pid = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        with db.connection() as other:
            assert other.execute("SELECT pg_terminate_backend(%s) AS done", (pid,)).fetchone()["done"]
        time.sleep(_RecentlyUsedCheck.FRESH_SECONDS + 0.1)
        with pool.connection() as conn:  # no OperationalError: the check found it broken
            assert conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"] != pid
