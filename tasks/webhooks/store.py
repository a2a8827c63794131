"""The webhook store: signing secrets, endpoints, deliveries and their attempts, as visible SQL.

Deliveries are created by the `jobs_webhook_event` trigger (migrations/0003_webhooks.sql) in the same
transaction as the job's status change, so no code path can change a job's status without its event.
A delivery is `pending` until an attempt gets a 2xx (`delivered`) or it is dead-lettered (`dead`).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from psycopg_pool import ConnectionPool

from tasks.jobs.status import TERMINAL, JobStatus
from tasks.webhooks.sealing import PLAIN, SecretBox
from tasks.webhooks.signing import new_secret

NOTIFY_CHANNEL = "switchyard_webhooks"
EVENTS = tuple(f"job.{s.value}" for s in JobStatus if s is JobStatus.RUNNING or s in TERMINAL)
DEFAULT_EVENTS = tuple(f"job.{s.value}" for s in JobStatus if s in TERMINAL)
DELIVERY_STATUSES = ("pending", "delivered", "dead")
LOST_ATTEMPT = "no outcome recorded: the worker stopped during the attempt"


# --- secrets ------------------------------------------------------------------------------------


# Secrets are stored sealed with `box` (tasks/webhooks/sealing.py) and returned opened; PLAIN (no key)
# stores them as they are.


def _opened(row: dict | None, box: SecretBox) -> dict | None:
    return None if row is None else {**row, "secret": box.open(row["secret"])}


def _current(conn, tenant_id) -> dict | None:
    return conn.execute("SELECT * FROM webhook_secrets WHERE tenant_id = %s AND expires_at IS NULL",
                        (tenant_id,)).fetchone()


def current_secret(pool: ConnectionPool, tenant_id, box: SecretBox = PLAIN) -> dict:
    """The tenant's current secret row, created on first use."""
    with pool.connection() as conn:
        row = _current(conn, tenant_id)
        if row is None:
            conn.execute("""INSERT INTO webhook_secrets (tenant_id, secret) VALUES (%s, %s)
                            ON CONFLICT (tenant_id) WHERE expires_at IS NULL DO NOTHING""",
                         (tenant_id, box.seal(new_secret())))
            row = _current(conn, tenant_id)
        return _opened(row, box)


def previous_secrets(pool: ConnectionPool, tenant_id, box: SecretBox = PLAIN) -> list[dict]:
    """Rotated-out secrets that still sign until they expire, newest first."""
    with pool.connection() as conn:
        return [_opened(r, box) for r in conn.execute(
            """SELECT * FROM webhook_secrets WHERE tenant_id = %s AND expires_at > now()
                ORDER BY created_at DESC""", (tenant_id,)).fetchall()]


def rotate_secret(pool: ConnectionPool, tenant_id, overlap_seconds: float, box: SecretBox = PLAIN) -> dict:
    """Replace the current secret; the old one keeps signing for `overlap_seconds`."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT 1 FROM tenants WHERE id = %s FOR UPDATE", (tenant_id,))  # one rotation at a time
        conn.execute("DELETE FROM webhook_secrets WHERE tenant_id = %s AND expires_at <= now()", (tenant_id,))
        conn.execute("""UPDATE webhook_secrets SET expires_at = now() + make_interval(secs => %s)
                         WHERE tenant_id = %s AND expires_at IS NULL""", (overlap_seconds, tenant_id))
        return _opened(conn.execute("INSERT INTO webhook_secrets (tenant_id, secret) VALUES (%s, %s) RETURNING *",
                                    (tenant_id, box.seal(new_secret()))).fetchone(), box)


def signing_secrets(pool: ConnectionPool, tenant_id, box: SecretBox = PLAIN) -> list[str]:
    """Every secret a delivery is signed with now: the current one first, then unexpired old ones."""
    with pool.connection() as conn:
        rows = conn.execute("""SELECT secret, expires_at FROM webhook_secrets
                                WHERE tenant_id = %s AND (expires_at IS NULL OR expires_at > now())
                                ORDER BY expires_at IS NULL DESC, created_at DESC""", (tenant_id,)).fetchall()
    if not rows or rows[0]["expires_at"] is not None:
        return [current_secret(pool, tenant_id, box)["secret"], *(box.open(r["secret"]) for r in rows)]
    return [box.open(r["secret"]) for r in rows]


def seal_stored_secrets(pool: ConnectionPool, box: SecretBox) -> int:
    """Seal every secret stored bare (written before a key was configured); returns how many."""
    with pool.connection() as conn, conn.transaction():
        rows = conn.execute("SELECT ctid, secret FROM webhook_secrets WHERE secret NOT LIKE 'sealed:%%' FOR UPDATE"
                            ).fetchall()
        for row in rows:
            conn.execute("UPDATE webhook_secrets SET secret = %s WHERE ctid = %s", (box.seal(row["secret"]), row["ctid"]))
    return len(rows)


# --- endpoints ----------------------------------------------------------------------------------


def disable_endpoint(pool: ConnectionPool, tenant_id, url: str, reason: str) -> None:
    """Stop sending to `url` for this tenant, and dead-letter what was still waiting for it."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("""INSERT INTO webhook_endpoints (tenant_id, url, disabled_at, disabled_reason)
                        VALUES (%s, %s, now(), %s)
                        ON CONFLICT (tenant_id, url) DO UPDATE
                           SET disabled_at = excluded.disabled_at, disabled_reason = excluded.disabled_reason""",
                     (tenant_id, url, reason))
        conn.execute("""UPDATE webhook_deliveries SET status = 'dead', lease_until = NULL,
                               last_error = 'not sent: the endpoint was disabled (' || %s || ')'
                         WHERE tenant_id = %s AND url = %s AND status = 'pending'""", (reason, tenant_id, url))


def enable_endpoint(pool: ConnectionPool, tenant_id, url: str) -> dict | None:
    """Re-enable a disabled endpoint; None when it is not disabled."""
    with pool.connection() as conn:
        return conn.execute("""UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL
                                WHERE tenant_id = %s AND url = %s AND disabled_at IS NOT NULL RETURNING *""",
                            (tenant_id, url)).fetchone()


def disabled_endpoints(pool: ConnectionPool, tenant_id) -> list[dict]:
    with pool.connection() as conn:
        return conn.execute("""SELECT * FROM webhook_endpoints WHERE tenant_id = %s AND disabled_at IS NOT NULL
                                ORDER BY disabled_at DESC""", (tenant_id,)).fetchall()


# --- deliveries: dispatcher side ----------------------------------------------------------------


def claim_due(pool: ConnectionPool, *, limit: int, lease_seconds: float, per_tenant: int = 2**31 - 1) -> list[dict]:
    """Lease due deliveries for dispatch, oldest first. SKIP LOCKED and the lease keep two dispatchers
    apart. A tenant never has more than `per_tenant` deliveries leased (on the queue or being sent)
    at once: one whose receivers are slow holds back its own deliveries only, never another's."""
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE webhook_deliveries SET lease_until = now() + make_interval(secs => %(lease)s)
                WHERE id IN (
                    SELECT id FROM webhook_deliveries WHERE id IN (
                        SELECT due.id
                          FROM (SELECT id, tenant_id, next_attempt_at,
                                       row_number() OVER (PARTITION BY tenant_id ORDER BY next_attempt_at) AS nth
                                  FROM webhook_deliveries
                                 WHERE status = 'pending' AND next_attempt_at <= now()
                                   AND (lease_until IS NULL OR lease_until < now())) due
                          LEFT JOIN (SELECT tenant_id, count(*) AS n FROM webhook_deliveries
                                      WHERE status = 'pending' AND lease_until >= now()
                                      GROUP BY tenant_id) leased USING (tenant_id)
                         WHERE due.nth + coalesce(leased.n, 0) <= %(per_tenant)s
                         ORDER BY due.next_attempt_at
                         LIMIT %(limit)s)
                      AND status = 'pending' AND (lease_until IS NULL OR lease_until < now())
                    FOR UPDATE SKIP LOCKED)
            RETURNING id, attempts""",
            {"lease": lease_seconds, "limit": limit, "per_tenant": per_tenant},
        ).fetchall()


def release(pool: ConnectionPool, ids: list) -> None:
    """Give back leases whose task could not be enqueued, so the next sweep tries again."""
    with pool.connection() as conn:
        conn.execute("UPDATE webhook_deliveries SET lease_until = NULL WHERE id = ANY(%s) AND status = 'pending'",
                     (list(ids),))


# --- deliveries: task side ----------------------------------------------------------------------


def begin_attempt(pool: ConnectionPool, delivery_id, attempt: int, *, lease_seconds: float) -> dict | None:
    """Claim attempt number `attempt` and log it; None when that attempt was already taken (a duplicate
    or stale task message) or the delivery is no longer pending. The row comes with its endpoint's
    state and the tenant's signing secrets (`has_current` false: the tenant has none yet)."""
    with pool.connection() as conn:
        return conn.execute(
            """WITH claimed AS (
                   UPDATE webhook_deliveries SET attempts = attempts + 1,
                          lease_until = now() + make_interval(secs => %(lease)s)
                    WHERE id = %(id)s AND status = 'pending' AND attempts = %(attempt)s - 1
                      AND next_attempt_at <= now()
                RETURNING *
               ), logged AS (
                   INSERT INTO webhook_attempts (delivery_id, attempt, error)
                   SELECT id, attempts, %(lost)s FROM claimed
               )
               SELECT c.*, e.disabled_at, e.disabled_reason,
                      array(SELECT s.secret FROM webhook_secrets s
                             WHERE s.tenant_id = c.tenant_id AND (s.expires_at IS NULL OR s.expires_at > now())
                             ORDER BY s.expires_at IS NULL DESC, s.created_at DESC) AS secrets,
                      EXISTS (SELECT FROM webhook_secrets s WHERE s.tenant_id = c.tenant_id AND s.expires_at IS NULL)
                          AS has_current
                 FROM claimed c LEFT JOIN webhook_endpoints e ON e.tenant_id = c.tenant_id AND e.url = c.url""",
            {"id": delivery_id, "attempt": attempt, "lease": lease_seconds, "lost": LOST_ATTEMPT},
        ).fetchone()


def finish_attempt(pool: ConnectionPool, delivery_id, attempt: int, *, status: str, delay: float = 0.0,
                   status_code: int | None = None, latency_ms: float | None = None, error: str | None = None) -> bool:
    """Record an attempt's outcome: `delivered`, `dead`, or `pending` again after `delay` seconds.
    False when a newer attempt has taken the delivery over (the attempt is still logged). The lease is
    given back and the dispatchers are told (NOTIFY): the tenant has room in flight again."""
    with pool.connection() as conn:
        row = conn.execute(
            f"""WITH logged AS (
                   UPDATE webhook_attempts SET status_code = %(code)s, latency_ms = %(latency)s, error = %(error)s
                    WHERE delivery_id = %(id)s AND attempt = %(attempt)s
               ), done AS (
               UPDATE webhook_deliveries
                  SET status = %(status)s, lease_until = NULL,
                      next_attempt_at = CASE WHEN %(status)s = 'pending'
                                             THEN now() + make_interval(secs => %(delay)s) ELSE next_attempt_at END,
                      delivered_at = CASE WHEN %(status)s = 'delivered' THEN now() ELSE delivered_at END,
                      last_status_code = %(code)s, last_error = %(error)s
                WHERE id = %(id)s AND attempts = %(attempt)s AND status = 'pending'
               RETURNING id)
               SELECT (SELECT count(*) FROM done) AS finished, pg_notify('{NOTIFY_CHANNEL}', 'slot')""",
            {"id": delivery_id, "attempt": attempt, "status": status, "delay": delay, "code": status_code,
             "latency": latency_ms, "error": error},
        ).fetchone()
        return row["finished"] == 1


# --- deliveries: API side -----------------------------------------------------------------------


def _with_attempts(conn, rows: list[dict]) -> list[dict]:
    attempts = conn.execute("SELECT * FROM webhook_attempts WHERE delivery_id = ANY(%s) ORDER BY attempt",
                            ([r["id"] for r in rows],)).fetchall()
    for row in rows:
        row["attempt_log"] = [a for a in attempts if a["delivery_id"] == row["id"]]
    return rows


def deliveries_for_job(pool: ConnectionPool, job_id, tenant_id) -> list[dict]:
    """The job's deliveries, oldest first, each with its `attempt_log` (oldest attempt first)."""
    with pool.connection() as conn:
        return _with_attempts(conn, conn.execute(
            "SELECT * FROM webhook_deliveries WHERE job_id = %s AND tenant_id = %s ORDER BY created_at, id",
            (job_id, tenant_id)).fetchall())


def list_deliveries(pool: ConnectionPool, tenant_id, *, limit: int, status: str | None,
                    after: tuple[datetime, uuid.UUID] | None) -> list[dict]:
    """The tenant's deliveries, newest first (`status='dead'`: the dead letters); `after` is the
    (created_at, id) of the last one of the previous page."""
    with pool.connection() as conn:
        return _with_attempts(conn, conn.execute(
            """SELECT * FROM webhook_deliveries
                WHERE tenant_id = %(tenant)s
                  AND (%(status)s::text IS NULL OR status = %(status)s::text)
                  AND (%(ts)s::timestamptz IS NULL OR (created_at, id) < (%(ts)s::timestamptz, %(id)s::uuid))
                ORDER BY created_at DESC, id DESC
                LIMIT %(limit)s""",
            {"tenant": tenant_id, "status": status, "limit": limit,
             "ts": after[0] if after else None, "id": after[1] if after else None}).fetchall())


def get_delivery(pool: ConnectionPool, delivery_id, job_id, tenant_id) -> dict | None:
    with pool.connection() as conn:
        return conn.execute("""SELECT d.*, e.disabled_at, e.disabled_reason
                                 FROM webhook_deliveries d
                                 LEFT JOIN webhook_endpoints e ON e.tenant_id = d.tenant_id AND e.url = d.url
                                WHERE d.id = %s AND d.job_id = %s AND d.tenant_id = %s""",
                            (delivery_id, job_id, tenant_id)).fetchone()


def retry_delivery(pool: ConnectionPool, delivery_id, job_id, tenant_id) -> dict | None:
    """Send a finished (delivered or dead) delivery once more, now, with the same webhook-id.
    None when it is missing or still pending."""
    with pool.connection() as conn:
        return conn.execute(
            f"""WITH retried AS (
                    UPDATE webhook_deliveries
                       SET status = 'pending', next_attempt_at = now(), lease_until = NULL,
                           max_attempts = attempts + 1
                     WHERE id = %s AND job_id = %s AND tenant_id = %s AND status <> 'pending'
                 RETURNING *
                )
                SELECT retried.*, pg_notify('{NOTIFY_CHANNEL}', retried.id::text) AS notified FROM retried""",
            (delivery_id, job_id, tenant_id),
        ).fetchone()
