"""1000 jobs with webhooks: 1000 deliveries, every signature verified with the official package, every
event id received exactly once, through two competing webhooks workers. Prints the closing-note numbers."""

from __future__ import annotations

import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
from standardwebhooks import Webhook

from tasks.webhooks import store as webhooks
from tests.system.webhooks.support import new_job, run_to_end, wait_until

N = 1000

pytestmark = pytest.mark.usefixtures("webhook_workers")


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_thousand_jobs_thousand_verified_deliveries_each_id_once(db, tenant, receiver, capsys):
    t, _ = tenant
    path = "/bulk"
    jobs = [new_job(db, t.id, receiver.url(path)) for _ in range(N)]
    with ThreadPoolExecutor(4) as pool:  # the pool fixture holds 4 connections
        list(pool.map(lambda job: run_to_end(db, job), jobs))

    receiver.wait(lambda rs: len({r.id for r in rs if r.path == path}) >= N, timeout=60)
    wait_until(lambda: _status_counts(db, t.id).get("delivered") == N, what="all rows marked delivered")
    counts = _status_counts(db, t.id)

    got = [r for r in receiver.at(path)]
    per_id = Counter(r.id for r in got)
    seen: dict[str, object] = {}  # the receiver deduplicates by webhook-id
    secret = webhooks.current_secret(db, t.id)["secret"]
    for r in got:
        event = Webhook(secret).verify(r.body, r.headers)  # raises on any bad signature
        assert event["type"] == "job.succeeded" and event["data"]["status"] == "succeeded"
        seen.setdefault(r.id, (r, event))
    assert len(seen) == N and set(per_id.values()) == {1}, f"duplicates: {[i for i, c in per_id.items() if c > 1]}"
    assert {e["data"]["id"] for _, e in seen.values()} == {str(j["id"]) for j in jobs}

    latencies = sorted((r.at - datetime.fromisoformat(e["timestamp"]).timestamp()) * 1000 for r, e in seen.values())
    with db.connection() as conn:
        rows = conn.execute("""SELECT extract(epoch FROM a.started_at - d.created_at) * 1000 AS waited, a.latency_ms
                                 FROM webhook_deliveries d JOIN webhook_attempts a ON a.delivery_id = d.id
                                WHERE d.tenant_id = %s""", (t.id,)).fetchall()
    waited = sorted(float(r["waited"]) for r in rows)
    http = sorted(r["latency_ms"] for r in rows)
    with capsys.disabled():
        print(f"\n[webhooks] {N} jobs: delivered {counts.get('delivered', 0)}, failed {counts.get('dead', 0)}, "
              f"pending {counts.get('pending', 0)}; {len(got)} requests received for {len(seen)} ids "
              f"(duplicates {len(got) - len(seen)})\n"
              f"[webhooks] latency, status change -> receiver: p50 {_percentile(latencies, 50):.0f} ms, "
              f"p95 {_percentile(latencies, 95):.0f} ms, max {latencies[-1]:.0f} ms "
              f"(of which waiting for a worker: p50 {_percentile(waited, 50):.0f} ms, "
              f"p95 {_percentile(waited, 95):.0f} ms; HTTP exchange: p50 {_percentile(http, 50):.1f} ms, "
              f"p95 {_percentile(http, 95):.1f} ms)")
    assert counts == {"delivered": N}


def _status_counts(db, tenant_id) -> dict[str, int]:
    with db.connection() as conn:
        rows = conn.execute("""SELECT d.status, count(*) AS n FROM webhook_deliveries d
                                WHERE d.tenant_id = %s GROUP BY d.status""", (tenant_id,)).fetchall()
    return {r["status"]: r["n"] for r in rows}

