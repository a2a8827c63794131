"""Helpers for the webhook tests on real worker processes: the compressed retry schedule, the workers'
environment, and the job store calls the tests drive (the receiver and the SSRF matrix are in
tests/receiver.py)."""

from __future__ import annotations

import os

from ops import processes
from tasks.jobs import store
from tasks.jobs.status import JobStatus

# Compressed back-off for the tests: 6 attempts over ~9 s (production: 9 over ~27 h).
SCHEDULE = (0.3, 0.6, 1.2, 2.4, 4.8)
JITTER = 0.1
WORKERS = 2


def wait_until(predicate, timeout: float = 20, what: str = "condition"):
    """Poll a database condition (no event to wait on); returns the predicate's truthy value."""
    return processes.wait_until(predicate, timeout, what, interval=0.05)


def worker_env(settings) -> dict[str, str]:
    """The environment of a webhooks worker process for these settings."""
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "SWITCHYARD_WEBHOOK_ALLOW": ",".join(settings.webhook_allow),
        "SWITCHYARD_WEBHOOK_RETRY_SCHEDULE": ",".join(map(str, settings.webhook_retry_schedule)),
        "SWITCHYARD_WEBHOOK_RETRY_JITTER": str(settings.webhook_retry_jitter),
        "SWITCHYARD_WEBHOOK_SWEEP_INTERVAL": str(settings.webhook_sweep_interval),
        "SWITCHYARD_WEBHOOK_CONCURRENCY": "16",
        "PYTHONUNBUFFERED": "1",
    }


# The only two places these tests call the job store's insert and finish: after a change to those
# signatures, adapt these helpers and nothing else.
def new_job(db, tenant_id, url: str | None,
            events=("job.succeeded", "job.failed", "job.cancelled", "job.dead")) -> dict:
    return store.insert_job(db, tenant_id=tenant_id, model="m", strategy="round_robin",
                            request={"prompt": "hi", "max_tokens": 4}, metadata={"k": "v"}, max_attempts=3,
                            webhook={"url": url, "events": list(events)} if url else None)[0]


def finish(db, job: dict, status: JobStatus, node: str = "n1") -> bool:
    result = {"text": "done"} if status is JobStatus.SUCCEEDED else None
    error = {"type": "engine", "message": "boom"} if status is JobStatus.FAILED else None
    return store.finish_job(db, job["id"], job["attempt"], status, node_id=node, result=result, error=error)


def run_to_end(db, job: dict, status: JobStatus = JobStatus.SUCCEEDED, node: str = "n1") -> None:
    """Drive a job through the store's own transitions, as router and GPU worker do."""
    assert store.mark_routed(db, job["id"], job["attempt"], node)
    assert store.start_jobs(db, [(job["id"], job["attempt"])], node)
    assert finish(db, job, status, node)


def deliveries(db, job_id) -> list[dict]:
    with db.connection() as conn:
        return conn.execute("SELECT * FROM webhook_deliveries WHERE job_id = %s ORDER BY created_at",
                            (job_id,)).fetchall()


def attempts(db, delivery_id) -> list[dict]:
    with db.connection() as conn:
        return conn.execute("SELECT * FROM webhook_attempts WHERE delivery_id = %s ORDER BY attempt",
                            (delivery_id,)).fetchall()
