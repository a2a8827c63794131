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

import psycopg
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

#: the columns a router needs to (re)publish a job
DISPATCH_COLUMNS = "id, attempt, model, routing_strategy, affinity_key"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job_id):
        super().__init__(job_id)
        self.job_id = job_id


def insert_job(pool: ConnectionPool, *, tenant_id, model: str, strategy: str, request: dict, metadata: dict,
               max_attempts: int, session_id: str | None = None, affinity_key: str | None = None,
               idempotency: tuple[str, bytes, int] | None = None,
               webhook: dict | None = None) -> tuple[dict, bool]:
    """Insert a queued job; returns (row, created).

    With `idempotency` = (key, request digest, ttl seconds), a live key returns the job it created
    (created=False) instead of inserting, and a key reused with another digest raises
    IdempotencyConflict. Concurrent requests with one key serialize on the key's primary key: the
    loser waits for the winner's commit, then reads its job."""
    job_id = uuid.uuid4()
    with pool.connection() as conn:
        with conn.transaction():
            row = conn.execute(
                """INSERT INTO jobs (id, tenant_id, status, model, routing_strategy, request, metadata,
                                     max_attempts, session_id, affinity_key, webhook)
                   VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *""",
                (job_id, tenant_id, model, strategy, Jsonb(request), Jsonb(metadata), max_attempts,
                 session_id, affinity_key, Jsonb(webhook) if webhook is not None else None),
            ).fetchone()
            if idempotency is None:
                return row, True
            key, digest, ttl = idempotency
            claimed = conn.execute(
                """INSERT INTO idempotency_keys (tenant_id, key, request_hash, job_id, expires_at)
                   VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))
                   ON CONFLICT (tenant_id, key) DO UPDATE
                      SET request_hash = EXCLUDED.request_hash, job_id = EXCLUDED.job_id,
                          expires_at = EXCLUDED.expires_at
                    WHERE idempotency_keys.expires_at <= now()
                RETURNING job_id""",
                (tenant_id, key, digest, job_id, ttl),
            ).fetchone()
            if claimed is not None:
                return row, True
            # The key is taken and live: undo this insert and answer with the original job.
            conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
        existing = conn.execute(
            """SELECT k.request_hash, j.* FROM idempotency_keys k JOIN jobs j ON j.id = k.job_id
                WHERE k.tenant_id = %s AND k.key = %s""",
            (tenant_id, key),
        ).fetchone()
    if existing is None:  # the original expired and was replaced between our statements: rare, retryable
        raise psycopg.errors.SerializationFailure("idempotency key changed hands; retry")
    if bytes(existing.pop("request_hash")) != digest:
        raise IdempotencyConflict(existing["id"])
    return existing, False


def delete_unpublished_job(pool: ConnectionPool, job_id) -> None:
    """Undo an insert whose publish failed, so a refused submission leaves nothing behind
    (its idempotency key goes with it, by cascade)."""
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


#: Pseudo node ids of shared pull queues (settings.pull_queues, the routing benchmark's baseline): a job
#: routed to `pull:<name>` waits on queue node.pull:<name> for whichever worker consuming it is free.
PULL_PREFIX = "pull:"


def pull_node_id(name: str) -> str:
    return PULL_PREFIX + name


def start_jobs(pool: ConnectionPool, items: list[tuple[str, int]], node_id: str) -> list[dict]:
    """routed → running for a batch; returns only the jobs this node may run (not cancelled, not stale).

    A job routed to a shared pull queue (a `pull:` pseudo node) is claimed by the node that starts it:
    only workers consuming that queue receive its message, and the attempt fences stale copies."""
    if not items:
        return []
    ids, attempts = zip(*items)
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE jobs j SET status = 'running', started_at = now(), node_id = %s
                 FROM unnest(%s::uuid[], %s::int[]) AS t(id, attempt)
                WHERE j.id = t.id AND j.attempt = t.attempt AND j.status = 'routed'
                  AND (j.node_id = %s OR starts_with(j.node_id, %s))
            RETURNING j.id, j.attempt, j.model, j.request""",
            (node_id, list(ids), list(attempts), node_id, PULL_PREFIX),
        ).fetchall()


def crash_counts(pool: ConnectionPool, job_ids: list[str]) -> dict[str, int]:
    """For each job that has any: how many of its attempts were running when their worker or engine died."""
    with pool.connection() as conn:
        rows = conn.execute(
            """SELECT job_id, count(*) AS n FROM job_attempts
                WHERE job_id = ANY(%s::uuid[]) AND outcome IN ('retried', 'dead')
                  AND error->>'type' IN ('worker_lost', 'engine_dead')
                GROUP BY job_id""",
            (job_ids,),
        ).fetchall()
    return {str(r["job_id"]): r["n"] for r in rows}


def finish_job(pool: ConnectionPool, job_id, attempt: int, status: JobStatus, *, node_id: str,
               result=None, error=None) -> bool:
    """running → succeeded | failed, logged in job_attempts. False when the job moved on (cancelled, or
    a newer attempt): the outcome is then logged as `discarded` and changes nothing else."""
    assert status in (JobStatus.SUCCEEDED, JobStatus.FAILED)
    with pool.connection() as conn:
        row = conn.execute(
            """WITH done AS (
                   UPDATE jobs SET status = %(status)s, result = %(result)s, error = %(error)s, finished_at = now()
                    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
                RETURNING id)
               INSERT INTO job_attempts (job_id, attempt, node_id, outcome, error)
               SELECT %(id)s, %(attempt)s, %(node)s,
                      CASE WHEN EXISTS (SELECT 1 FROM done) THEN %(status)s ELSE 'discarded' END, %(error)s
               WHERE EXISTS (SELECT 1 FROM jobs WHERE id = %(id)s)
            RETURNING outcome""",
            {"status": status.value, "result": Jsonb(result) if result is not None else None,
             "error": Jsonb(error) if error is not None else None, "id": job_id, "attempt": attempt,
             "node": node_id},
        ).fetchone()
    return row is not None and row["outcome"] == status.value


def fail_queued_job(pool: ConnectionPool, job_id, attempt: int, error: dict) -> bool:
    """queued → failed, for a job that can never be routed (no node before its deadline)."""
    with pool.connection() as conn:
        cur = conn.execute(
            """UPDATE jobs SET status = 'failed', error = %s, finished_at = now()
                WHERE id = %s AND attempt = %s AND status = 'queued'""",
            (Jsonb(error), job_id, attempt),
        )
        return cur.rowcount == 1


def retry_job(pool: ConnectionPool, job_id, attempt: int, error: dict, *, delay: float = 0.0,
              charge: bool = True) -> dict | None:
    """routed|running → queued as the next attempt (due after `delay` s) after a retryable failure;
    or → dead, with a dead letter, when the job has used its attempts.

    The attempt count lives here, not in the broker. `charge=False` moves the fence (a new attempt
    number) without spending the job's budget: for a job that merely waited on a node that died, as
    opposed to one that was running there (a suspect, if the node keeps dying: a poison job).
    Returns the job's dispatch columns plus `status` (`queued`: publish it again; `dead`: tell its
    waiters), or None when the job had moved on."""
    with pool.connection() as conn, conn.transaction():
        job = conn.execute(
            "SELECT tenant_id, attempt, max_attempts, status, node_id FROM jobs WHERE id = %s FOR UPDATE",
            (job_id,),
        ).fetchone()
        if job is None or job["attempt"] != attempt or job["status"] not in ("routed", "running"):
            return None
        if attempt < job["max_attempts"] or not charge:
            outcome = "retried" if charge else "moved"
            row = conn.execute(
                f"""UPDATE jobs SET status = 'queued', attempt = attempt + 1, node_id = NULL, routed_at = NULL,
                           started_at = NULL, error = %s, queued_at = now() + make_interval(secs => %s),
                           max_attempts = max_attempts + %s
                     WHERE id = %s RETURNING status, {DISPATCH_COLUMNS}""",
                (Jsonb(error), delay, 0 if charge else 1, job_id),
            ).fetchone()
        else:
            outcome = "dead"
            final = {**error, "message": f"{error['message']} (gave up after {attempt} attempts)"}
            row = conn.execute(
                f"""UPDATE jobs SET status = 'dead', error = %s, finished_at = now()
                     WHERE id = %s RETURNING status, {DISPATCH_COLUMNS}""",
                (Jsonb(final), job_id),
            ).fetchone()
            conn.execute(
                """INSERT INTO dead_letters (id, job_id, tenant_id, reason, attempts, last_error)
                   VALUES (%s, %s, %s, %s, %s, %s)""",
                (uuid.uuid4(), job_id, job["tenant_id"], error.get("type", "error"), attempt, Jsonb(error)),
            )
        conn.execute(
            "INSERT INTO job_attempts (job_id, attempt, node_id, outcome, error) VALUES (%s, %s, %s, %s, %s)",
            (job_id, attempt, job["node_id"], outcome, Jsonb(error)),
        )
        return row


# --- recovery: what the reconciler looks for -----------------------------------------------------


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


def claim_stalled_queued(pool: ConnectionPool, *, older_than: float, limit: int = 1000) -> list[dict]:
    """Queued jobs due for longer than `older_than` s: their route message was lost or never sent (a
    crash between commit and publish). Their `queued_at` is bumped, so each is re-published at most
    once per period; a duplicate message is harmless (routing is conditional on status and attempt)."""
    with pool.connection() as conn:
        return conn.execute(
            f"""UPDATE jobs SET queued_at = now()
                 WHERE id IN (SELECT id FROM jobs
                               WHERE status = 'queued' AND queued_at < now() - make_interval(secs => %s)
                               ORDER BY queued_at LIMIT %s FOR UPDATE SKIP LOCKED)
             RETURNING {DISPATCH_COLUMNS}""",
            (older_than, limit),
        ).fetchall()


def active_attempts(pool: ConnectionPool, job_ids: list[str]) -> dict[str, tuple[int, str | None]]:
    """{job id: (attempt, node id)} for those of `job_ids` that are still queued, routed or running."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, attempt, node_id FROM jobs WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)",
            (job_ids, _ACTIVE),
        ).fetchall()
    return {str(r["id"]): (r["attempt"], r["node_id"]) for r in rows}


# --- dead letters ---------------------------------------------------------------------------------


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


def ping(pool: ConnectionPool) -> None:
    with pool.connection(timeout=2) as conn:
        conn.execute("SELECT 1")
