"""Helpers shared by the test packages (conftest.py files hold fixtures only)."""

from __future__ import annotations


def auth(key: str) -> dict:
    """The Authorization header for an API key."""
    return {"Authorization": f"Bearer {key}"}


def job_count(pool, tenant_id=None) -> int:
    """Jobs in the database, of one tenant or of all."""
    with pool.connection() as conn:
        return conn.execute("SELECT count(*) AS n FROM jobs WHERE %s::uuid IS NULL OR tenant_id = %s::uuid",
                            (tenant_id, tenant_id)).fetchone()["n"]
