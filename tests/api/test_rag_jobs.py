"""A job's `rag` field at submit: its collections must be the tenant's and searchable by the configured
embedder; a bad one is refused naming the field, with nothing stored or queued."""

from __future__ import annotations

import json
import uuid

import pytest

from retrieval import store
from tasks.jobs import tenants
from tests.api.support import queued_messages
from tests.support import auth, job_count


def _post(client, key, rag, **body):
    return client.post("/v1/jobs", data=json.dumps({"prompt": "What is the Zorblax?", "rag": rag, **body}),
                       headers={**auth(key), "Content-Type": "application/json"})


def _collection(client, key) -> str:
    response = client.post("/v1/collections", json={"name": f"c-{uuid.uuid4().hex[:8]}"}, headers=auth(key))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def _refused(response, db, api_redis, tenant_id, status, field):
    assert response.status_code == status, response.get_data(as_text=True)
    problem = response.get_json()
    assert any(e["field"].startswith(field) for e in problem.get("errors", [])), problem
    assert job_count(db, tenant_id) == 0 and queued_messages(api_redis) == 0
    return problem


def test_unknown_or_another_tenants_collection_is_422_naming_the_field(client, api_redis, db, tenant):
    t, key = tenant
    _other, other_key = tenants.create_tenant(db, f"tenant-{uuid.uuid4().hex[:8]}")
    theirs = _collection(client, other_key)
    mine = _collection(client, key)
    for rag in ({"collections": [str(uuid.uuid4())]}, {"collections": [theirs]}, {"collections": [mine, theirs]}):
        problem = _refused(_post(client, key, rag), db, api_redis, t.id, 422, "rag.collections")
        assert "no collection" in problem["detail"]
        assert mine not in problem["detail"]


@pytest.mark.parametrize("rag,field", [
    ({"collections": []}, "rag.collections"),
    ({"collections": ["not-a-uuid"]}, "rag.collections"),
    ({"collections": [str(uuid.uuid4()) for _ in range(9)]}, "rag.collections"),
    ({"mode": "semantic"}, "rag.mode"),
    ({"top_k": 0}, "rag.top_k"),
    ({"top_k": 21}, "rag.top_k"),
    ({"filter": "lang=en"}, "rag.filter"),
    ({"colour": "red"}, "rag.colour"),
], ids=["empty", "not-uuid", "too-many", "bad-mode", "top_k-0", "top_k-21", "filter-not-object", "unknown-key"])
def test_a_bad_rag_is_422_naming_the_field(client, api_redis, db, tenant, rag, field):
    t, key = tenant
    rag = {"collections": [_collection(client, key)], **rag}
    _refused(_post(client, key, rag), db, api_redis, t.id, 422, field)


def test_a_collection_of_another_embedding_model_is_refused_unless_keyword(client, app, api_redis, db, tenant):
    t, key = tenant
    with app.extensions["switchyard"].pool.connection() as conn:
        other = store.create_collection(conn, t.id, "other-model", embedding_model="e5-small", embedding_dim=384)
    _refused(_post(client, key, {"collections": [str(other.id)]}), db, api_redis, t.id, 422, "rag.collections")
    response = _post(client, key, {"collections": [str(other.id)], "mode": "keyword"})
    assert response.status_code == 202, response.get_json()


def test_a_good_rag_is_stored_with_its_defaults_and_shown_with_null_retrieval_times(client, api_redis, db, tenant):
    _, key = tenant
    collection = _collection(client, key)
    response = _post(client, key, {"collections": [collection, collection], "filter": {"lang": "en"}})
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["request"]["rag"] == {"collections": [collection], "top_k": 5, "mode": "hybrid",
                                     "filter": {"lang": "en"}}
    assert job["retrieval_started_at"] is None and job["retrieved_at"] is None
    plain = client.post("/v1/jobs", json={"prompt": "hi"}, headers=auth(key)).get_json()
    assert "rag" not in plain["request"] and plain["retrieved_at"] is None
