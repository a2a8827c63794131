"""Webhook dispatch is fair between tenants: one tenant never holds more than its share of deliveries
in flight, so its slow receivers hold back only its own (real Postgres, the webhook trigger)."""

from __future__ import annotations

import pytest
from psycopg.types.json import Jsonb

from tasks.jobs import store as jobs, tenants
from tasks.webhooks import store


@pytest.fixture(autouse=True)
def clean(app):
    with app.db.connection() as conn:
        conn.execute("TRUNCATE webhook_deliveries CASCADE")


def _deliveries(app, tenant_id, n: int) -> None:
    """n jobs with a webhook, finished: the trigger writes one pending delivery each."""
    for _ in range(n):
        row, _ = jobs.insert_job(app.db, tenant_id=tenant_id, model="m", strategy="round_robin",
                                 request={"prompt": "x"}, metadata={}, max_attempts=1,
                                 webhook={"url": "https://example.com/hook", "events": ["job.cancelled"]})
        with app.db.connection() as conn:
            conn.execute("UPDATE jobs SET status = 'cancelled', finished_at = now(), error = %s WHERE id = %s",
                         (Jsonb({"type": "cancelled", "message": "x"}), row["id"]))


def _tenants(app, rows) -> dict:
    with app.db.connection() as conn:
        owners = conn.execute("SELECT tenant_id, count(*) AS n FROM webhook_deliveries WHERE id = ANY(%s) "
                              "GROUP BY tenant_id", ([r["id"] for r in rows],)).fetchall()
    return {o["tenant_id"]: o["n"] for o in owners}


def test_a_tenant_with_a_backlog_gets_only_its_share_in_flight(app):
    busy, _ = tenants.create_tenant(app.db, "busy-hooks")
    quiet, _ = tenants.create_tenant(app.db, "quiet-hooks")
    _deliveries(app, busy.id, 20)
    _deliveries(app, quiet.id, 2)

    first = store.claim_due(app.db, limit=100, lease_seconds=60, per_tenant=8)
    assert _tenants(app, first) == {busy.id: 8, quiet.id: 2}
    assert store.claim_due(app.db, limit=100, lease_seconds=60, per_tenant=8) == []  # busy is at its cap

    store.release(app.db, [r["id"] for r in first][:3])  # three of them ended (released, like a finished attempt)
    again = store.claim_due(app.db, limit=100, lease_seconds=60, per_tenant=8)
    assert sum(_tenants(app, again).values()) == 3
