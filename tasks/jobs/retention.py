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
MAX_BATCHES = 20  # per call: a first purge of a large backlog spreads over several sweeps

_OLD_ENOUGH = """j.status = ANY(%(terminal)s)
                 AND j.finished_at < now() - make_interval(days => %(days)s::int) - make_interval(secs => %(secs)s::float8)
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_id = j.id AND d.status = 'pending')"""


def purge(pool: ConnectionPool, older_than_days: float, *, each=lambda: None) -> int:
    """Delete finished jobs older than `older_than_days`, at most MAX_BATCHES × BATCH of them; returns
    how many. `each()` runs before every batch (the reconciler extends its lock there)."""
    args = {"terminal": TERMINAL_VALUES, "days": int(older_than_days), "secs": (older_than_days % 1) * 86400,
            "batch": BATCH}
    purged = 0
    for _ in range(MAX_BATCHES):
        each()
        with pool.connection() as conn:
            # The test is repeated on the rows deleted: a job replayed meanwhile (dead → queued) stays.
            deleted = conn.execute(
                f"""DELETE FROM jobs j WHERE j.id IN (SELECT j.id FROM jobs j WHERE {_OLD_ENOUGH} LIMIT %(batch)s)
                      AND {_OLD_ENOUGH}""", args).rowcount
        purged += deleted
        if deleted < BATCH:
            break
    return purged
