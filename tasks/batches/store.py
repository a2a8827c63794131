"""The batch store: files and batches, as visible SQL. Functions take the connection they use; a batch
and its lines' jobs are written in one transaction (tasks.jobs.store.insert_jobs), all or none.

An open batch's request counts are read from its jobs (live_counts), so they are current whenever they
are read; an ended batch keeps the counts it ended with.
"""

from __future__ import annotations

import uuid

import psycopg
from psycopg.types.json import Jsonb

from tasks.jobs import store as jobs_store
from tasks.jobs.status import ACTIVE_VALUES

FILE_COLUMNS = "id, tenant_id, purpose, filename, bytes, lines, created_at"
#: the column each way of ending stamps
_ENDED_AT = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}


# --- files --------------------------------------------------------------------------------------


def insert_file(conn: psycopg.Connection, tenant_id, *, filename: str, purpose: str, content: bytes,
                lines: int) -> dict:
    return conn.execute(
        f"""INSERT INTO files (id, tenant_id, purpose, filename, bytes, lines, content)
            VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {FILE_COLUMNS}""",
        (uuid.uuid4(), tenant_id, purpose, filename, len(content), lines, content)).fetchone()


def get_file(conn: psycopg.Connection, file_id, tenant_id, *, content: bool = False) -> dict | None:
    """The tenant's file (another tenant's is missing); with its `content` if asked."""
    columns = FILE_COLUMNS + (", content" if content else "")
    return conn.execute(f"SELECT {columns} FROM files WHERE id = %s AND tenant_id = %s",
                        (file_id, tenant_id)).fetchone()


def list_files(conn: psycopg.Connection, tenant_id, *, purpose: str | None, limit: int, after=None,
               ascending: bool = False) -> list[dict]:
    """The tenant's files by creation time (newest first unless `ascending`), those after the file
    `after` only."""
    order, beyond = ("ASC", ">") if ascending else ("DESC", "<")
    return conn.execute(
        f"""SELECT {FILE_COLUMNS} FROM files
             WHERE tenant_id = %(tenant)s AND (%(purpose)s::text IS NULL OR purpose = %(purpose)s::text)
               AND (%(after)s::uuid IS NULL OR (created_at, id) {beyond}
                    (SELECT created_at, id FROM files WHERE id = %(after)s::uuid AND tenant_id = %(tenant)s))
             ORDER BY created_at {order}, id {order} LIMIT %(limit)s""",
        {"tenant": tenant_id, "purpose": purpose, "after": after, "limit": limit}).fetchall()


# --- batches: API side --------------------------------------------------------------------------


def _insert_batch(conn, *, tenant_id, status: str, endpoint: str, input_file_id, window: str, window_seconds: float,
                  metadata: dict | None, webhook_url: str | None, errors: list[dict] | None = None,
                  total: int = 0) -> dict:
    stamp = {"in_progress": "in_progress_at", "failed": "failed_at"}[status]
    return conn.execute(
        f"""INSERT INTO batches (id, tenant_id, status, endpoint, input_file_id, completion_window, metadata,
                                 webhook_url, errors, request_total, expires_at, {stamp})
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s), now())
            RETURNING *""",
        (uuid.uuid4(), tenant_id, status, endpoint, input_file_id, window,
         Jsonb(metadata) if metadata is not None else None, webhook_url, Jsonb(errors) if errors else None, total,
         window_seconds)).fetchone()


def create_batch(conn: psycopg.Connection, jobs: list[dict], **batch) -> tuple[dict, list[dict]]:
    """An `in_progress` batch and its lines' jobs (dicts with tasks.jobs.store's bulk columns but the
    id and batch_id, which are given here), in one transaction. Returns (batch, the jobs as inserted)."""
    with conn.transaction():
        row = _insert_batch(conn, status="in_progress", total=len(jobs), **batch)
        jobs = [{**job, "id": uuid.uuid4(), "batch_id": row["id"], "attempt": 1} for job in jobs]
        jobs_store.insert_jobs(conn, jobs)
    return row, jobs


def create_failed_batch(conn: psycopg.Connection, errors: list[dict], **batch) -> dict:
    """A batch refused by validation: stored `failed`, with what to fix, and no jobs."""
    return _insert_batch(conn, status="failed", errors=errors, **batch)


def get_batch(conn: psycopg.Connection, batch_id, tenant_id) -> dict | None:
    return conn.execute("SELECT * FROM batches WHERE id = %s AND tenant_id = %s", (batch_id, tenant_id)).fetchone()


def list_batches(conn: psycopg.Connection, tenant_id, *, limit: int, after=None) -> list[dict]:
    """The tenant's batches, newest first; those created before the batch `after` only."""
    return conn.execute(
        """SELECT * FROM batches
            WHERE tenant_id = %(tenant)s
              AND (%(after)s::uuid IS NULL OR (created_at, id) <
                   (SELECT created_at, id FROM batches WHERE id = %(after)s::uuid AND tenant_id = %(tenant)s))
            ORDER BY created_at DESC, id DESC LIMIT %(limit)s""",
        {"tenant": tenant_id, "after": after, "limit": limit}).fetchall()


def live_counts(conn: psycopg.Connection, batch_ids: list) -> dict:
    """{batch id: {total, completed, failed}} from the batches' jobs: succeeded lines are completed;
    failed, dead and cancelled ones failed."""
    if not batch_ids:
        return {}
    rows = conn.execute(
        """SELECT batch_id, count(*) AS total, count(*) FILTER (WHERE status = 'succeeded') AS completed,
                  count(*) FILTER (WHERE status IN ('failed', 'dead', 'cancelled')) AS failed
             FROM jobs WHERE batch_id = ANY(%s) GROUP BY batch_id""", (list(batch_ids),)).fetchall()
    return {r["batch_id"]: {"total": r["total"], "completed": r["completed"], "failed": r["failed"]} for r in rows}


def mark_cancelling(conn: psycopg.Connection, batch_id, tenant_id) -> dict | None:
    """in_progress → cancelling (its lines are cancelled by the reconciler); None when it is not open."""
    return conn.execute(
        """UPDATE batches SET status = 'cancelling', cancelling_at = now()
            WHERE id = %s AND tenant_id = %s AND status IN ('validating', 'in_progress') RETURNING *""",
        (batch_id, tenant_id)).fetchone()


# --- batches: reconciler side -------------------------------------------------------------------


def due(conn: psycopg.Connection) -> list[dict]:
    """Open batches with something to do: cancelling, past their window, or with every line finished
    (`settled`)."""
    return conn.execute(
        """SELECT * FROM (
               SELECT b.id, b.tenant_id, b.status, b.expires_at <= now() AS expired,
                      NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id AND j.status = ANY(%(active)s))
                          AS settled
                 FROM batches b WHERE b.status IN ('in_progress', 'cancelling')) d
            WHERE d.status = 'cancelling' OR d.expired OR d.settled
            ORDER BY d.id""", {"active": ACTIVE_VALUES}).fetchall()


def unfinished_jobs(conn: psycopg.Connection, batch_id) -> list[dict]:
    return conn.execute("SELECT id, tenant_id FROM jobs WHERE batch_id = %s AND status = ANY(%s)",
                        (batch_id, ACTIVE_VALUES)).fetchall()


def lock_open(conn: psycopg.Connection, batch_id) -> dict | None:
    """The batch, locked for the caller's transaction, if it is open and every line has finished."""
    return conn.execute(
        """SELECT * FROM batches b WHERE id = %s AND status IN ('in_progress', 'cancelling')
              AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id AND j.status = ANY(%s))
              FOR UPDATE""", (batch_id, ACTIVE_VALUES)).fetchone()


def finished_jobs(conn: psycopg.Connection, batch_id) -> list[dict]:
    """What a batch's output is built from, in line order."""
    return conn.execute(
        """SELECT id, custom_id, status, model, created_at, result, error FROM jobs
            WHERE batch_id = %s ORDER BY batch_line""", (batch_id,)).fetchall()


def end_batch(conn: psycopg.Connection, batch_id, status: str, *, output_file_id, error_file_id, completed: int,
              failed: int, usage: dict) -> dict:
    """The open batch → completed, expired or cancelled, with its files and final counts (its webhook
    event is written by the trigger, in the same transaction)."""
    return conn.execute(
        f"""UPDATE batches SET status = %s, finalizing_at = now(), {_ENDED_AT[status]} = clock_timestamp(),
                   output_file_id = %s, error_file_id = %s, request_total = %s, request_completed = %s,
                   request_failed = %s, usage = %s
             WHERE id = %s RETURNING *""",
        (status, output_file_id, error_file_id, completed + failed, completed, failed, Jsonb(usage), batch_id)
    ).fetchone()
