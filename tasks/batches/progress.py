"""Moving open batches on (a reconciler step, tasks/jobs/reconciler.py, every sweep):

- a batch whose lines have all finished ends `completed`;
- one past its completion window has its unfinished lines cancelled and ends `expired` with what
  finished (the rest in its error file, `batch_expired`);
- one being cancelled (POST /v1/batches/{id}/cancel marked it `cancelling`) has its unfinished lines
  cancelled and ends `cancelled`, again with what finished.

Ending is one transaction (finalize): the batch locked, its output and error files written from its
jobs, the batch stamped with its files, final counts and usage, and its webhook event written by the
trigger. A sweep that dies half-way leaves the batch open, and the next sweep does it again.
"""

from __future__ import annotations

import logging

from tasks.batches import output, store
from tasks.batches.resource import batch_id as public_batch_id
from tasks.jobs import lifecycle

log = logging.getLogger(__name__)

_REASONS = {"expired": "its batch's completion window ended before it ran",
            "cancelled": "its batch was cancelled"}


def advance(app, each=lambda: None) -> int:
    """Do what is due for every open batch; returns how many batches ended. `each()` runs before each
    batch and every 100 cancelled lines (the reconciler extends its lock there)."""
    with app.db.connection() as conn:
        due = store.due(conn)
    ended = 0
    for batch in due:
        each()
        if batch["settled"]:
            status = "cancelled" if batch["status"] == "cancelling" else "completed"
        else:
            status = "cancelled" if batch["status"] == "cancelling" else "expired"
            _cancel_lines(app, batch, _REASONS[status], each)
        if finalize(app, batch["id"], status) is not None:
            ended += 1
    return ended


def _cancel_lines(app, batch: dict, reason: str, each) -> None:
    with app.db.connection() as conn:
        jobs = store.unfinished_jobs(conn, batch["id"])
    for i, job in enumerate(jobs):
        if i % 100 == 0:
            each()
        lifecycle.cancel(app, job["id"], job["tenant_id"], reason=reason)


def finalize(app, batch_id, status: str) -> dict | None:
    """End an open batch whose lines have all finished as `status`, writing its output and error files;
    the ended batch, or None when it is not open or some line is still unfinished."""
    with app.db.connection() as conn, conn.transaction():
        batch = store.lock_open(conn, batch_id)
        if batch is None:
            return None
        built = output.build(batch["endpoint"], status, store.finished_jobs(conn, batch_id))
        name = public_batch_id(batch_id)
        files = {}
        for kind, content, lines in (("output", built.output, built.completed), ("error", built.errors, built.failed)):
            if lines:
                files[kind] = store.insert_file(conn, batch["tenant_id"], filename=f"{name}_{kind}.jsonl",
                                                purpose="batch_output", content=content, lines=lines)["id"]
        row = store.end_batch(conn, batch_id, status, output_file_id=files.get("output"),
                              error_file_id=files.get("error"), completed=built.completed, failed=built.failed,
                              usage=built.usage)
    log.info("batch %s %s: %d completed, %d failed", name, status, built.completed, built.failed)
    return row
