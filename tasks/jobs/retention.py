"""Retention: finished jobs older than settings.retention_days are deleted, with everything that hangs
off them (attempt log, dead letter, idempotency key, webhook deliveries and their attempts: by cascade).

A job whose webhook is still being delivered (a delivery `pending`, retrying for up to a day) is kept
until the delivery ends. Deleting runs in batches, so no transaction holds many rows locked; the
reconciler calls `purge` about once an hour.
"""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from tasks.jobs.status import TERMINAL_VALUES

BATCH = 1000


def purge(pool: ConnectionPool, older_than_days: float, *, each=lambda: None) -> int:
    """Delete finished jobs older than `older_than_days`; returns how many. `each()` runs before every
    batch (the reconciler extends its lock there)."""
    purged = 0
    while True:
        each()
        with pool.connection() as conn:
            deleted = conn.execute(
                """DELETE FROM jobs WHERE id IN (
                       SELECT j.id FROM jobs j
                        WHERE j.status = ANY(%s) AND j.finished_at < now() - make_interval(days => %s::int)
                                                                      - make_interval(secs => %s::float8)
                          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                                           WHERE d.job_id = j.id AND d.status = 'pending')
                        LIMIT %s)""",
                (TERMINAL_VALUES, int(older_than_days), (older_than_days % 1) * 86400, BATCH)).rowcount
        purged += deleted
        if deleted < BATCH:
            return purged
