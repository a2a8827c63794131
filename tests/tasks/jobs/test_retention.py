"""Retention over real Postgres: old finished jobs go with their attempts, dead letters and deliveries;
active jobs, recent ones and those whose webhook is still being delivered stay."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tasks.jobs import retention, store
from tasks.jobs.reconciler import Reconciler


def _job(app, tenant, *, status: str = "succeeded", days_ago: float = 40, webhook: bool = False) -> dict:
    row, _ = store.insert_job(app.db, tenant_id=tenant.id, model="m", strategy="round_robin", request={"prompt": "x"},
                              metadata={}, max_attempts=1,
                              webhook={"url": "https://example.com/h", "events": [f"job.{status}"]} if webhook else None)
    if status != "queued":
        with app.db.connection() as conn:
            conn.execute("UPDATE jobs SET status = %s, result = %s WHERE id = %s",
                         (status, Jsonb({"text": "x"}), row["id"]))
            conn.execute("UPDATE jobs SET finished_at = now() - make_interval(days => %s) WHERE id = %s",
                         (days_ago, row["id"]))
    return row


def _exists(app, job) -> bool:
    with app.db.connection() as conn:
        return conn.execute("SELECT 1 FROM jobs WHERE id = %s", (job["id"],)).fetchone() is not None


def test_old_finished_jobs_are_purged_and_the_rest_kept(app, app_tenant):
    old = _job(app, app_tenant)
    old_failed = _job(app, app_tenant, status="failed", days_ago=31)
    recent = _job(app, app_tenant, days_ago=3)
    active = _job(app, app_tenant, status="queued")
    delivering = _job(app, app_tenant, webhook=True)  # its delivery is pending
    assert retention.purge(app.db, 30) >= 2
    assert not _exists(app, old) and not _exists(app, old_failed)
    assert all(_exists(app, j) for j in (recent, active, delivering))
    with app.db.connection() as conn:
        conn.execute("UPDATE webhook_deliveries SET status = 'delivered' WHERE job_id = %s", (delivering["id"],))
    assert Reconciler(app).sweep()["purged"] == 1 and not _exists(app, delivering)
