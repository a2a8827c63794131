"""The reconciler's queries: jobs the happy path may have stranded, as visible SQL."""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import ConnectionPool

from tasks.jobs.status import ACTIVE_VALUES
from tasks.jobs.store import DISPATCH_COLUMNS


def jobs_on_nodes_not_in(pool: ConnectionPool, live_node_ids: list[str]) -> list[dict]:
    """Routed or running jobs whose node is not live (its heartbeat expired, or it left)."""
    with pool.connection() as conn:
        return conn.execute(
            """SELECT id, attempt, node_id, status FROM jobs
                WHERE status IN ('routed', 'running') AND node_id <> ALL(%s::text[])""",
            (live_node_ids,),
        ).fetchall()


def jobs_on_node(pool: ConnectionPool, node_id: str, statuses: tuple[str, ...]) -> list[dict]:
    with pool.connection() as conn:
        return conn.execute(
            "SELECT id, attempt, node_id, status FROM jobs WHERE node_id = %s AND status = ANY(%s)",
            (node_id, list(statuses)),
        ).fetchall()


def overdue_jobs(pool: ConnectionPool, *, routed_for: float, running_for: float) -> list[dict]:
    """Jobs on live nodes that sat routed (the node-queue message was lost) or running (the node is
    wedged) far longer than any healthy job could."""
    with pool.connection() as conn:
        return conn.execute(
            """SELECT id, attempt, node_id, status FROM jobs
                WHERE (status = 'routed' AND routed_at < now() - make_interval(secs => %s))
                   OR (status = 'running' AND started_at < now() - make_interval(secs => %s))""",
            (routed_for, running_for),
        ).fetchall()


def stalled_queued(pool: ConnectionPool, *, older_than: float, after: datetime | None = None,
                   limit: int = 5000) -> list[dict]:
    """Queued jobs (id, queued_at) due for longer than `older_than` s, oldest first, those due after
    `after` only when given (to page on). Either their route message was lost or never sent (a crash
    between commit and publish), or they are waiting their turn in the fair queue: the caller tells
    them apart (tasks.routing.fair_queue.pending)."""
    with pool.connection() as conn:
        return conn.execute(
            """SELECT id::text, queued_at FROM jobs
                WHERE status = 'queued' AND queued_at < now() - make_interval(secs => %s)
                  AND (%s::timestamptz IS NULL OR queued_at > %s)
                ORDER BY queued_at LIMIT %s""",
            (older_than, after, after, limit),
        ).fetchall()


def claim_queued(pool: ConnectionPool, job_ids: list[str], *, older_than: float) -> list[dict]:
    """Those of `job_ids` still queued and due for longer than `older_than` s, to be published again.
    Their `queued_at` is bumped, so each is re-published at most once per period; a duplicate message
    is harmless (routing is conditional on status and attempt)."""
    if not job_ids:
        return []
    with pool.connection() as conn:
        return conn.execute(
            f"""UPDATE jobs SET queued_at = now()
                 WHERE id = ANY(%s::uuid[]) AND status = 'queued' AND queued_at < now() - make_interval(secs => %s)
             RETURNING {DISPATCH_COLUMNS}""",
            (job_ids, older_than),
        ).fetchall()


def active_attempts(pool: ConnectionPool, job_ids: list[str]) -> dict[str, tuple[int, str | None]]:
    """{job id: (attempt, node id)} for those of `job_ids` that are still queued, routed or running."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, attempt, node_id FROM jobs WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)",
            (job_ids, ACTIVE_VALUES),
        ).fetchall()
    return {str(r["id"]): (r["attempt"], r["node_id"]) for r in rows}



def routed_longer_than(pool: ConnectionPool, seconds: float) -> list[dict]:
    """Jobs routed more than `seconds` ago and not yet started: their node-queue message may be lost."""
    with pool.connection() as conn:
        return conn.execute(
            """SELECT id, attempt, node_id, status FROM jobs
                WHERE status = 'routed' AND routed_at < now() - make_interval(secs => %s)
                ORDER BY routed_at""",
            (seconds,),
        ).fetchall()


def past_their_deadline(pool: ConnectionPool, limit: int = 500) -> list[dict]:
    """Active jobs whose client's Cancel-After deadline has passed."""
    with pool.connection() as conn:
        return conn.execute(
            """SELECT id, tenant_id FROM jobs
                WHERE cancel_at < now() AND cancel_at IS NOT NULL AND status IN ('queued', 'routed', 'running')
                ORDER BY cancel_at LIMIT %s""", (limit,)).fetchall()
