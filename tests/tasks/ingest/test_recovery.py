"""The reconciler's ingestion step over real Postgres and Redis, with no ingest worker: documents left
`processing` by a dead worker, or `queued` with their message lost, are sent to the ingest queue again;
a document simply waiting its turn is not."""

from __future__ import annotations

import json
import uuid

import pytest

from retrieval import store
from tasks.ingest import recovery
from tasks.ingest.task import document_of, publish
from tasks.jobs.reconciler import Reconciler
from tasks.names import INGEST_QUEUE


@pytest.fixture(autouse=True)
def clean(app):
    app.redis.flushdb()
    with app.db.connection() as conn:
        conn.execute("TRUNCATE documents CASCADE")


def _document(app, tenant_id, text: str, *, status: str, idle: float) -> dict:
    """A stored document in `status`, its last progress `idle` seconds ago."""
    with app.db.connection() as conn:
        collection = store.create_collection(conn, tenant_id, f"c-{uuid.uuid4().hex[:8]}",
                                             embedding_model="all-MiniLM-L6-v2", embedding_dim=384)
        doc, _ = store.add_document(conn, tenant_id, collection.id, text.encode(), title=text,
                                    content_type="text/plain")
        conn.execute("UPDATE documents SET status = %s, updated_at = now() - make_interval(secs => %s) WHERE id = %s",
                     (status, idle, doc["id"]))
    return doc


def _waiting(app) -> list[str]:
    return [document_of(json.loads(m)["headers"]["id"]) for m in app.redis.lrange(INGEST_QUEUE, 0, -1)]


def test_stranded_documents_are_sent_again_once_and_healthy_ones_are_left_alone(app, app_tenant):
    dead_run = _document(app, app_tenant.id, "a worker died half way", status="processing", idle=30)
    lost = _document(app, app_tenant.id, "its message was lost", status="queued", idle=30)
    behind = _document(app, app_tenant.id, "waiting behind others", status="queued", idle=30)
    publish(app, behind)
    busy = _document(app, app_tenant.id, "a run making progress", status="processing", idle=0)
    fresh = _document(app, app_tenant.id, "just uploaded", status="queued", idle=0)
    publish(app, fresh)

    assert recovery.resume_stalled(app) == 2
    assert sorted(_waiting(app)) == sorted(str(d["id"]) for d in (dead_run, lost, behind, fresh))
    assert recovery.resume_stalled(app) == 0  # once per stall period, however many sweeps run
    assert busy["id"] not in _waiting(app)


def test_the_reconciler_sweep_runs_the_step(app, app_tenant):
    doc = _document(app, app_tenant.id, "left processing", status="processing", idle=30)
    assert Reconciler(app).sweep()["documents_resent"] == 1
    assert _waiting(app) == [str(doc["id"])]
