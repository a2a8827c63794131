"""Dead letters: jobs that used up their attempts, listed and replayed, as visible SQL."""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from tasks.jobs.store import DISPATCH_COLUMNS


def list_dead_letters(pool: ConnectionPool, tenant_id=None, *, limit: int = 100,
                      include_replayed: bool = False) -> list[dict]:
    """Newest first; `tenant_id=None` lists every tenant's (admin)."""
    with pool.connection() as conn:
        return conn.execute(
            """SELECT d.*, j.model, j.status AS job_status FROM dead_letters d JOIN jobs j ON j.id = d.job_id
                WHERE (%(tenant)s::uuid IS NULL OR d.tenant_id = %(tenant)s::uuid)
                  AND (%(all)s OR d.replayed_at IS NULL)
                ORDER BY d.created_at DESC LIMIT %(limit)s""",
            {"tenant": tenant_id, "all": include_replayed, "limit": limit},
        ).fetchall()


def replay_dead_letter(pool: ConnectionPool, dead_letter_id, tenant_id=None) -> dict | None:
    """dead → queued as a new attempt with a fresh budget of attempts; None when there is no open dead
    letter with that id (for that tenant). Returns the job's dispatch columns."""
    with pool.connection() as conn, conn.transaction():
        letter = conn.execute(
            """UPDATE dead_letters SET replayed_at = now()
                WHERE id = %s AND replayed_at IS NULL AND (%s::uuid IS NULL OR tenant_id = %s::uuid)
            RETURNING job_id""",
            (dead_letter_id, tenant_id, tenant_id),
        ).fetchone()
        if letter is None:
            return None
        return conn.execute(
            f"""UPDATE jobs SET status = 'queued',
                       max_attempts = attempt + COALESCE((request->>'max_attempts')::int, max_attempts),
                       attempt = attempt + 1, node_id = NULL, routed_at = NULL, started_at = NULL,
                       finished_at = NULL, queued_at = now()
                 WHERE id = %s AND status = 'dead' RETURNING {DISPATCH_COLUMNS}""",
            (letter["job_id"],),
        ).fetchone()

