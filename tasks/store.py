"""The job store: every read and write of jobs, tenants and API keys, as visible SQL.

Postgres is the source of truth. Each state transition is one conditional UPDATE naming the state it
expects and the attempt it belongs to (the fencing token), so a duplicate delivery or a late result from
an abandoned attempt changes nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from tasks.status import ACTIVE, JobStatus

_ACTIVE = [s.value for s in ACTIVE]


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    name: str
    default_strategy: str | None
    is_admin: bool = False


# --- tenants and keys ---------------------------------------------------------------------------


def create_tenant(pool: ConnectionPool, name: str, *, admin: bool = False) -> tuple[Tenant, str]:
    """Create a tenant and its first API key; the clear key is returned once and never stored."""
    key = "sy_" + secrets.token_urlsafe(32)
    tenant_id = uuid.uuid4()
    with pool.connection() as conn, conn.transaction():
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, name))
        conn.execute(
            "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, is_admin) VALUES (%s, %s, %s, %s, %s)",
            (uuid.uuid4(), tenant_id, hash_api_key(key), key[:10], admin),
        )
    return Tenant(tenant_id, name, None, admin), key


def tenant_for_key(pool: ConnectionPool, key: str) -> Tenant | None:
    with pool.connection() as conn:
        row = conn.execute(
            """SELECT t.id, t.name, t.default_strategy, k.is_admin
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
                WHERE k.key_hash = %s AND k.revoked_at IS NULL""",
            (hash_api_key(key),),
        ).fetchone()
    return Tenant(row["id"], row["name"], row["default_strategy"], row["is_admin"]) if row else None


# --- jobs: API side -----------------------------------------------------------------------------


def insert_job(pool: ConnectionPool, *, tenant_id, model: str, strategy: str, request: dict, metadata: dict,
               webhook: dict | None = None) -> dict:
    with pool.connection() as conn:
        return conn.execute(
            """INSERT INTO jobs (id, tenant_id, status, model, routing_strategy, request, metadata, webhook)
               VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s) RETURNING *""",
            (uuid.uuid4(), tenant_id, model, strategy, Jsonb(request), Jsonb(metadata),
             Jsonb(webhook) if webhook is not None else None),
        ).fetchone()


def delete_unpublished_job(pool: ConnectionPool, job_id) -> None:
    """Undo an insert whose publish failed, so a refused submission leaves nothing behind."""
    with pool.connection() as conn:
        conn.execute("DELETE FROM jobs WHERE id = %s AND status = 'queued' AND attempt = 1", (job_id,))


def get_job(pool: ConnectionPool, job_id, tenant_id=None) -> dict | None:
    """A job by id; with `tenant_id`, only if that tenant owns it (another tenant's job is missing)."""
    with pool.connection() as conn:
        return conn.execute(
            "SELECT * FROM jobs WHERE id = %s AND (%s::uuid IS NULL OR tenant_id = %s::uuid)",
            (job_id, tenant_id, tenant_id),
        ).fetchone()


def list_jobs(
    pool: ConnectionPool, tenant_id, *, limit: int, status: str | None, after: tuple[datetime, uuid.UUID] | None
) -> list[dict]:
    """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
    with pool.connection() as conn:
        return conn.execute(
            """SELECT * FROM jobs
                WHERE tenant_id = %(tenant)s
                  AND (%(status)s::text IS NULL OR status = %(status)s::text)
                  AND (%(ts)s::timestamptz IS NULL OR (created_at, id) < (%(ts)s::timestamptz, %(id)s::uuid))
                ORDER BY created_at DESC, id DESC
                LIMIT %(limit)s""",
            {"tenant": tenant_id, "status": status, "limit": limit,
             "ts": after[0] if after else None, "id": after[1] if after else None},
        ).fetchall()


def cancel_job(pool: ConnectionPool, job_id, tenant_id) -> dict | None:
    """Cancel an active job; returns the updated row, or None when it is missing or already finished."""
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE jobs SET status = 'cancelled', finished_at = now(),
                      error = '{"type": "cancelled", "message": "cancelled by the client"}'::jsonb
                WHERE id = %s AND tenant_id = %s AND status = ANY(%s) RETURNING *""",
            (job_id, tenant_id, _ACTIVE),
        ).fetchone()


# --- jobs: router and worker side ---------------------------------------------------------------


def mark_routed(pool: ConnectionPool, job_id, attempt: int, node_id: str) -> dict | None:
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE jobs SET status = 'routed', node_id = %s, routed_at = now()
                WHERE id = %s AND attempt = %s AND status = 'queued' RETURNING id, attempt""",
            (node_id, job_id, attempt),
        ).fetchone()


def start_jobs(pool: ConnectionPool, items: list[tuple[str, int]], node_id: str) -> list[dict]:
    """routed → running for a batch; returns only the jobs this node may run (not cancelled, not stale)."""
    if not items:
        return []
    ids, attempts = zip(*items)
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE jobs j SET status = 'running', started_at = now()
                 FROM unnest(%s::uuid[], %s::int[]) AS t(id, attempt)
                WHERE j.id = t.id AND j.attempt = t.attempt AND j.status = 'routed' AND j.node_id = %s
            RETURNING j.id, j.attempt, j.model, j.request""",
            (list(ids), list(attempts), node_id),
        ).fetchall()


def finish_job(pool: ConnectionPool, job_id, attempt: int, status: JobStatus, *, result=None, error=None) -> bool:
    """running → succeeded | failed. False when the job moved on (cancelled, or a newer attempt)."""
    assert status in (JobStatus.SUCCEEDED, JobStatus.FAILED)
    with pool.connection() as conn:
        cur = conn.execute(
            """UPDATE jobs SET status = %s, result = %s, error = %s, finished_at = now()
                WHERE id = %s AND attempt = %s AND status = 'running'""",
            (status.value, Jsonb(result) if result is not None else None,
             Jsonb(error) if error is not None else None, job_id, attempt),
        )
        return cur.rowcount == 1


def fail_queued_job(pool: ConnectionPool, job_id, attempt: int, error: dict) -> bool:
    """queued → failed, for a job that can never be routed (no node before its deadline)."""
    with pool.connection() as conn:
        cur = conn.execute(
            """UPDATE jobs SET status = 'failed', error = %s, finished_at = now()
                WHERE id = %s AND attempt = %s AND status = 'queued'""",
            (Jsonb(error), job_id, attempt),
        )
        return cur.rowcount == 1


def requeue_job(pool: ConnectionPool, job_id, attempt: int, error: dict, *, max_attempts: int) -> dict | None:
    """routed|running → queued with the next attempt number, after a retryable failure (engine died).

    Returns the row (id, attempt, routing_strategy) to publish again, or None when the job moved on
    or has used `max_attempts` (then it is failed with `error`)."""
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            """UPDATE jobs SET status = 'queued', attempt = attempt + 1, node_id = NULL,
                      routed_at = NULL, started_at = NULL, error = %s
                WHERE id = %s AND attempt = %s AND status IN ('routed', 'running')
                  AND attempt < %s
            RETURNING id, attempt, routing_strategy""",
            (Jsonb(error), job_id, attempt, max_attempts),
        ).fetchone()
        if row is None:
            conn.execute(
                """UPDATE jobs SET status = 'failed', error = %s, finished_at = now()
                    WHERE id = %s AND attempt = %s AND status IN ('routed', 'running')""",
                (Jsonb({**error, "message": f"{error['message']} (gave up after {attempt} attempts)"}),
                 job_id, attempt),
            )
        return row



def ping(pool: ConnectionPool) -> None:
    with pool.connection(timeout=2) as conn:
        conn.execute("SELECT 1")
