"""The ingest task's outcomes on real Postgres + pgvector with the real embedding model (no broker: the
task's function is called as the worker's thread would)."""

from __future__ import annotations

import uuid

import pytest

from retrieval import store
from retrieval.embedding import Embedder
from tasks.ingest.task import ingest


@pytest.fixture(scope="module")
def embedder():
    model = Embedder()
    model.load()
    return model


def _document(db, tenant_id, embedding_model: str, dim: int, text: bytes = b"Lanterns glow in the harbour."):
    with db.connection() as conn:
        collection = store.create_collection(conn, tenant_id, f"c-{uuid.uuid4().hex[:8]}",
                                             embedding_model=embedding_model, embedding_dim=dim)
        return store.add_document(conn, tenant_id, collection.id, text, title="t", content_type="text/plain")[0]


def _state(db, document_id) -> dict:
    with db.connection() as conn:
        return conn.execute("SELECT status, error, attempt, (SELECT count(*) FROM chunks WHERE document_id = d.id) "
                            "AS chunks FROM documents d WHERE id = %s", (document_id,)).fetchone()


def test_a_document_is_indexed_once_and_a_duplicate_message_does_nothing(db, tenant, embedder, base_settings):
    doc = _document(db, tenant[0].id, embedder.model_name, embedder.dimension)
    assert ingest(db, embedder, base_settings, str(tenant[0].id), str(doc["id"])) == "ready"
    first = _state(db, doc["id"])
    assert first["status"] == "ready" and first["chunks"] == 1
    assert ingest(db, embedder, base_settings, str(tenant[0].id), str(doc["id"])) == "ready"
    assert _state(db, doc["id"]) == first  # not claimed again


def test_a_deleted_document_is_dropped(db, tenant, embedder, base_settings):
    assert ingest(db, embedder, base_settings, str(tenant[0].id), str(uuid.uuid4())) == "missing"


def test_another_models_collection_leaves_the_document_failed_with_the_reason(db, tenant, embedder, base_settings):
    doc = _document(db, tenant[0].id, "some-other-model", 768)
    assert ingest(db, embedder, base_settings, str(tenant[0].id), str(doc["id"])) == "failed"
    state = _state(db, doc["id"])
    assert state["status"] == "failed" and "some-other-model" in state["error"] and state["chunks"] == 0
