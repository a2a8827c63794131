"""The webhook body is built from the trigger's snapshot of the job row (to_jsonb: every timestamp as
text): every timestamp the job resource shows must come out of it, a RAG job's and a Cancel-After
job's included (their deliveries failed inside Switchyard on every attempt before)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from tasks.jobs import tenants
from tasks.webhooks.sender import payload


def test_payload_of_a_rag_job_with_a_deadline(app):
    tenant_id = tenants.create_tenant(app.db, f"payload-{uuid.uuid4().hex[:6]}")[0].id
    job_id = uuid.uuid4()
    hook = {"url": "https://example.com/hooks", "events": ["job.succeeded"]}
    with app.db.connection() as conn:
        conn.execute("""INSERT INTO jobs (id, tenant_id, status, model, routing_strategy, request, webhook, cancel_at,
                                          routed_at, started_at, retrieval_started_at, retrieved_at)
                        VALUES (%s, %s, 'running', 'm', 'round_robin', '{"rag": {}}', %s, now() + interval '1 hour',
                                now(), now(), now(), now())""", (job_id, tenant_id, json.dumps(hook)))
        conn.execute("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (job_id,))
        delivery = conn.execute("SELECT * FROM webhook_deliveries WHERE job_id = %s", (job_id,)).fetchone()
    event = json.loads(payload(delivery))
    data = event["data"]
    assert data["id"] == str(job_id) and event["type"] == "job.succeeded"
    for key in ("created_at", "routed_at", "started_at", "retrieval_started_at", "retrieved_at", "finished_at",
                "cancel_at"):
        assert datetime.fromisoformat(data[key]).tzinfo is not None, key
