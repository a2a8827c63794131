"""The job store: every read and write of a job's row and its attempt log, as visible SQL.

Postgres is the source of truth. Each state transition is one conditional UPDATE naming the state it
expects and the attempt it belongs to (the fencing token), so a duplicate delivery or a late result from
an abandoned attempt changes nothing.
"""

from __future__ import annotations

import uuid
from contextlib import nullcontext
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from tasks.errors import CRASHES
from tasks.jobs.status import ACTIVE_VALUES, JobStatus


# --- jobs: API side -----------------------------------------------------------------------------

#: the columns a router needs to (re)publish a job
DISPATCH_COLUMNS = ("id, attempt, model, routing_strategy, affinity_key, tenant_id, priority, "
                    "(request->>'max_tokens')::int AS max_tokens")


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job_id):
        super().__init__(job_id)
        self.job_id = job_id


def insert_job(pool: ConnectionPool, *, tenant_id, model: str, strategy: str, request: dict, metadata: dict,
               max_attempts: int, priority: str = "interactive", session_id: str | None = None,
               affinity_key: str | None = None,
               idempotency: tuple[str, bytes, int] | None = None,
               webhook: dict | None = None, cached_result: dict | None = None,
               cancel_after: float | None = None) -> tuple[dict, bool]:
    """Insert a queued job; returns (row, created). With `cached_result` (a result-cache hit), the job
    is moved on to `succeeded` with it in the same transaction (an update, so the webhook trigger
    sees the transition like any other).

    With `idempotency` = (key, request digest, ttl seconds), a live key returns the job it created
    (created=False) instead of inserting, and a key reused with another digest raises
    IdempotencyConflict. Concurrent requests with one key serialize on the key's primary key: the
    loser waits for the winner's commit, then reads its job."""
    job_id = uuid.uuid4()
    with pool.connection() as conn:
        # One statement needs no transaction block (autocommit): two round trips fewer per submit.
        single = idempotency is None and cached_result is None
        with nullcontext() if single else conn.transaction():
            row = conn.execute(
                """INSERT INTO jobs (id, tenant_id, status, model, routing_strategy, priority, request, metadata,
                                     max_attempts, session_id, affinity_key, webhook, cancel_at)
                   VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s, %s, %s,
                           now() + make_interval(secs => %s::float8)) RETURNING *""",
                (job_id, tenant_id, model, strategy, priority, Jsonb(request), Jsonb(metadata), max_attempts,
                 session_id, affinity_key, Jsonb(webhook) if webhook is not None else None, cancel_after),
            ).fetchone()
            if cached_result is not None:
                row = conn.execute(
                    """UPDATE jobs SET status = 'succeeded', result = %s, started_at = now(), finished_at = now()
                        WHERE id = %s RETURNING *""", (Jsonb(cached_result), job_id)).fetchone()
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


#: what insert_jobs() writes per job (the rest take their defaults: queued, attempt 1, due now)
_BULK_COLUMNS = ("id", "tenant_id", "model", "routing_strategy", "priority", "request", "metadata", "max_attempts",
                 "session_id", "affinity_key", "batch_id", "batch_line", "custom_id")


def insert_jobs(conn: psycopg.Connection, jobs: list[dict]) -> None:
    """Insert many queued jobs (dicts with _BULK_COLUMNS) with one COPY, in the caller's transaction: a
    batch's lines, all of them or none."""
    with conn.cursor().copy(f"COPY jobs ({', '.join(_BULK_COLUMNS)}, status) FROM STDIN") as copy:
        for job in jobs:
            copy.write_row([Jsonb(job[c]) if c in ("request", "metadata") else job[c] for c in _BULK_COLUMNS]
                           + ["queued"])


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


def cancel_job(pool: ConnectionPool, job_id, tenant_id, error: dict) -> dict | None:
    """Cancel an active job; returns the updated row, or None when it is missing or already finished."""
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE jobs SET status = 'cancelled', finished_at = now(), error = %s
                WHERE id = %s AND tenant_id = %s AND status = ANY(%s) RETURNING *""",
            (Jsonb(error), job_id, tenant_id, ACTIVE_VALUES),
        ).fetchone()


def active_load(pool: ConnectionPool, tenant_id) -> tuple[int, int]:
    """(jobs not finished, the prompt tokens they hold) for one tenant."""
    with pool.connection() as conn:
        row = conn.execute(
            """SELECT count(*) AS jobs, coalesce(sum((request ->> 'prompt_tokens')::int), 0) AS tokens
                 FROM jobs WHERE tenant_id = %s AND status IN ('queued', 'routed', 'running')""",
            (tenant_id,)).fetchone()
    return row["jobs"], row["tokens"]


# --- jobs: router and worker side ---------------------------------------------------------------


def mark_routed(pool: ConnectionPool, job_id, attempt: int, node_id: str) -> dict | None:
    """queued → routed to `node_id`; None when the job is not queued at this attempt."""
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE jobs SET status = 'routed', node_id = %s, routed_at = now()
                WHERE id = %s AND attempt = %s AND status = 'queued' RETURNING id, attempt""",
            (node_id, job_id, attempt),
        ).fetchone()


def mark_routed_many(pool: ConnectionPool, items: list[tuple[str, int, str]]) -> set[tuple[str, int]]:
    """mark_routed for many (job id, attempt, node id) in one statement; returns the (job id, attempt)
    pairs that moved (the others were not queued at that attempt)."""
    if not items:
        return set()
    ids, attempts, nodes = (list(column) for column in zip(*items))
    with pool.connection() as conn:
        rows = conn.execute(
            """UPDATE jobs SET status = 'routed', node_id = v.node_id, routed_at = now()
                 FROM unnest(%s::uuid[], %s::int[], %s::text[]) AS v(id, attempt, node_id)
                WHERE jobs.id = v.id AND jobs.attempt = v.attempt AND jobs.status = 'queued'
            RETURNING jobs.id::text, jobs.attempt""",
            ([str(i) for i in ids], attempts, nodes),
        ).fetchall()
    return {(r["id"], r["attempt"]) for r in rows}


def mark_waiting(pool: ConnectionPool, job_id, attempt: int) -> bool:
    """A queued job still waiting for a node: bump its due time, so the reconciler does not take it for
    one whose route message was lost. False when the job is no longer queued at this attempt."""
    with pool.connection() as conn:
        return conn.execute("UPDATE jobs SET queued_at = now() WHERE id = %s AND attempt = %s AND status = 'queued'",
                            (job_id, attempt)).rowcount == 1


def routed_node(pool: ConnectionPool, job_id, attempt: int) -> str | None:
    """The node a job is routed to at this attempt (None unless it is `routed` at this attempt)."""
    with pool.connection() as conn:
        row = conn.execute("SELECT node_id FROM jobs WHERE id = %s AND attempt = %s AND status = 'routed'",
                           (job_id, attempt)).fetchone()
    return row["node_id"] if row else None


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
            RETURNING j.id, j.attempt, j.model, j.request, j.tenant_id, j.created_at, j.routed_at, j.started_at""",
            (list(ids), list(attempts), node_id),
        ).fetchall()


def mark_retrieval(pool: ConnectionPool, items: list[tuple[str, int]], column: str) -> None:
    """Stamp `column` (retrieval_started_at or retrieved_at) on running attempts of a RAG batch."""
    if column not in ("retrieval_started_at", "retrieved_at") or not items:
        return
    ids, attempts = zip(*items)
    with pool.connection() as conn:
        conn.execute(
            f"""UPDATE jobs j SET {column} = clock_timestamp()
                  FROM unnest(%s::uuid[], %s::int[]) AS t(id, attempt)
                 WHERE j.id = t.id AND j.attempt = t.attempt AND j.status = 'running'""",
            ([str(i) for i in ids], list(attempts)),
        )


def crash_counts(pool: ConnectionPool, job_ids: list[str]) -> dict[str, int]:
    """For each job that has any: how many of its attempts were running when their worker or engine died."""
    with pool.connection() as conn:
        rows = conn.execute(
            """SELECT job_id, count(*) AS n FROM job_attempts
                WHERE job_id = ANY(%s::uuid[]) AND outcome IN ('retried', 'dead')
                  AND error->>'type' = ANY(%s)
                GROUP BY job_id""",
            (job_ids, sorted(k.value for k in CRASHES)),
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


def ping(pool: ConnectionPool) -> None:
    with pool.connection(timeout=2) as conn:
        conn.execute("SELECT 1")
