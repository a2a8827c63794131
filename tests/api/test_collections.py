"""Collections, documents and search over HTTP: the API in-process over real Postgres + pgvector and
Redis, with the real embedding model. Ingestion runs in-process by calling the ingest task's function
(the ingest worker process is exercised in tests/system/retrieval)."""

from __future__ import annotations

import io
import json
import uuid

import kombu.exceptions
import pytest

from api import create_app
from retrieval import store
from tasks.ingest.task import ingest
from tasks.jobs import tenants
from tests.retrieval.support import make_pdf
from tests.support import auth

GUIDE = """# Switchyard guide

## Routing

The router sends each job to the node with the fewest outstanding jobs when least connections is chosen.

## Storage

Every collection keeps its chunks in Postgres with a pgvector column and an HNSW index.
"""


def _services(app):
    return app.extensions["switchyard"]


def _collection(client, key, name=None) -> dict:
    response = client.post("/v1/collections", json={"name": name or f"c-{uuid.uuid4().hex[:8]}"}, headers=auth(key))
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _add_text(client, key, collection_id, text, **fields):
    return client.post(f"/v1/collections/{collection_id}/documents", json={"title": "t", "text": text, **fields},
                       headers=auth(key))


def _upload(client, key, collection_id, filename, data: bytes, **form):
    return client.post(f"/v1/collections/{collection_id}/documents", headers=auth(key),
                       data={"file": (io.BytesIO(data), filename), **form}, content_type="multipart/form-data")


def _ingest(app, tenant_id, document_id) -> dict:
    services = _services(app)
    ingest(services.pool, services.embedder, services.settings, str(tenant_id), str(document_id))
    with services.pool.connection() as conn:
        return conn.execute("SELECT status, error, chunks_embedded, chunks_total FROM documents WHERE id = %s",
                            (document_id,)).fetchone()


def _stored(db, tenant_id) -> tuple[int, int]:
    """(documents, chunks) the tenant has in the database."""
    with db.connection() as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM documents WHERE tenant_id = %s) AS d, "
                           "(SELECT count(*) FROM chunks WHERE tenant_id = %s) AS c", (tenant_id, tenant_id)).fetchone()
    return row["d"], row["c"]


def _search(client, key, collection_id, **params):
    return client.get(f"/v1/collections/{collection_id}/search", query_string=params, headers=auth(key))


def _problem(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.get_json())
    assert response.mimetype == "application/problem+json"
    return response.get_json()


# --- collections --------------------------------------------------------------------------------------


def test_collections_are_created_listed_read_and_deleted(client, tenant):
    _, key = tenant
    response = client.post("/v1/collections", json={"name": "manuals", "metadata": {"team": "ops", "v": 2}},
                           headers=auth(key))
    assert response.status_code == 201 and response.headers["Location"].endswith(response.get_json()["id"])
    made = response.get_json()
    assert made["object"] == "collection" and made["embedding_model"] == "all-MiniLM-L6-v2"
    assert made["metadata"] == {"team": "ops", "v": 2}
    assert made["embedding_dim"] == 384 and made["hnsw"] == {"m": 16, "ef_construction": 64}
    other = _collection(client, key, "notes")
    assert [c["name"] for c in client.get("/v1/collections", headers=auth(key)).get_json()["data"]] == \
        ["manuals", "notes"]
    assert client.get(f"/v1/collections/{made['id']}", headers=auth(key)).get_json() == made
    assert "already exists" in _problem(client.post("/v1/collections", json={"name": "manuals"},
                                                    headers=auth(key)), 409)["detail"]
    assert client.delete(f"/v1/collections/{made['id']}", headers=auth(key)).status_code == 204
    _problem(client.get(f"/v1/collections/{made['id']}", headers=auth(key)), 404)
    _problem(client.delete(f"/v1/collections/{made['id']}", headers=auth(key)), 404)
    assert [c["id"] for c in client.get("/v1/collections", headers=auth(key)).get_json()["data"]] == [other["id"]]


@pytest.mark.parametrize("body,field", [({}, "name"), ({"name": "  "}, "name"), ({"name": 3}, "name"),
                                        ({"name": "x", "metadata": {"deep": {"a": 1}}}, "metadata.deep"),
                                        ({"name": "x", "colour": "red"}, "colour")])
def test_a_bad_collection_request_is_422(client, tenant, body, field):
    problem = _problem(client.post("/v1/collections", json=body, headers=auth(tenant[1])), 422)
    assert problem["errors"] and all(e["field"].startswith(field) for e in problem["errors"]), problem
    assert client.get("/v1/collections", headers=auth(tenant[1])).get_json()["data"] == []


# --- documents ----------------------------------------------------------------------------------------


def test_json_and_file_documents_are_stored_queued_ingested_and_searchable(app, client, tenant, api_redis, db):
    tenant_row, key = tenant
    collection = _collection(client, key)
    base = f"/v1/collections/{collection['id']}/documents"
    added = _add_text(client, key, collection["id"], GUIDE, content_type="text/markdown", metadata={"lang": "en"})
    assert added.status_code == 202 and added.headers["Location"].endswith(added.get_json()["id"])
    doc = added.get_json()
    assert (doc["status"], doc["chunks_embedded"], doc["chunks_total"], doc["metadata"]) == ("queued", 0, None,
                                                                                              {"lang": "en"})
    pdf = make_pdf([["Pelicans nest on the islands of the lake."], ["The harbour freezes in January."]])
    uploaded = _upload(client, key, collection["id"], "birds.pdf", pdf, metadata=json.dumps({"lang": "fr"}))
    assert uploaded.status_code == 202, uploaded.get_json()
    upload = uploaded.get_json()
    assert (upload["title"], upload["source_filename"], upload["content_type"]) == ("birds.pdf", "birds.pdf",
                                                                                   "application/pdf")
    assert api_redis.llen("ingest") == 2  # one ingest message per stored document

    for document in (doc, upload):
        state = _ingest(app, tenant_row.id, document["id"])
        assert state["status"] == "ready" and state["chunks_embedded"] == state["chunks_total"] > 0, state
    listed = client.get(base, headers=auth(key)).get_json()["data"]
    assert {d["id"]: d["status"] for d in listed} == {doc["id"]: "ready", upload["id"]: "ready"}
    got = client.get(f"{base}/{doc['id']}", headers=auth(key)).get_json()
    assert got["chunks_total"] == got["chunks_embedded"] > 0 and got["error"] is None

    for mode in ("vector", "keyword", "hybrid"):
        result = _search(client, key, collection["id"], q="fewest outstanding jobs routing", mode=mode, k=2)
        assert result.status_code == 200, result.get_json()
        hits = result.get_json()["data"]
        assert hits and hits[0]["document_id"] == doc["id"], (mode, hits)
        top = hits[0]
        assert "fewest outstanding jobs" in top["text"] and top["title"] == "t"
        assert top["heading_path"] == ["Switchyard guide", "Routing"] and top["page"] is None
        assert isinstance(top["score"], float) and mode in top["scores"] or mode == "hybrid" and "rrf" in top["scores"]
        assert {"chunk_id", "ordinal", "char_start", "char_end"} <= set(top)
    pelicans = _search(client, key, collection["id"], q="where do pelicans nest", mode="vector", k=1).get_json()
    assert pelicans["data"][0]["document_id"] == upload["id"] and pelicans["data"][0]["page"] == 1
    filtered = _search(client, key, collection["id"], q="pelicans routing", filter=json.dumps({"lang": "fr"}))
    assert {h["document_id"] for h in filtered.get_json()["data"]} == {upload["id"]}

    assert client.delete(f"{base}/{doc['id']}", headers=auth(key)).status_code == 204
    _problem(client.get(f"{base}/{doc['id']}", headers=auth(key)), 404)
    with db.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM chunks WHERE document_id = %s", (doc["id"],)).fetchone()["n"] == 0
    assert all(h["document_id"] != doc["id"] for h in
               _search(client, key, collection["id"], q="fewest outstanding jobs").get_json()["data"])


def test_the_same_content_twice_is_one_document(client, tenant, api_redis):
    _, key = tenant
    collection = _collection(client, key)
    first = _add_text(client, key, collection["id"], "Once is enough.")
    again = _add_text(client, key, collection["id"], "Once is enough.", title="another title")
    as_file = _upload(client, key, collection["id"], "same.txt", b"Once is enough.")
    assert first.status_code == 202
    assert again.status_code == as_file.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert first.get_json()["id"] == again.get_json()["id"] == as_file.get_json()["id"]
    assert len(client.get(f"/v1/collections/{collection['id']}/documents", headers=auth(key)).get_json()["data"]) == 1
    assert api_redis.llen("ingest") == 1
    elsewhere = _collection(client, key)
    assert _add_text(client, key, elsewhere["id"], "Once is enough.").status_code == 202  # per collection


@pytest.fixture
def small_app(api_settings):
    """The API with a 2 KiB upload limit."""
    return create_app(api_settings.model_copy(update={"max_upload_bytes": 2048}))


def test_bad_uploads_are_refused_and_store_nothing(small_app, tenant, api_redis, db):
    tenant_row, key = tenant
    client = small_app.test_client()
    collection = _collection(client, key)
    cid = collection["id"]
    base = f"/v1/collections/{cid}/documents"
    cases = [
        (_upload(client, key, cid, "slides.pptx", b"PK\x03\x04"), 415, "unsupported file type"),
        (_upload(client, key, cid, "noext", b"hello"), 415, "unsupported file type"),
        (_upload(client, key, cid, "empty.txt", b""), 422, "empty"),
        (_upload(client, key, cid, "blank.md", b"  \n\n "), 422, "empty"),
        (_upload(client, key, cid, "big.txt", b"x" * 2049), 413, "larger than 2048 bytes"),
        (_upload(client, key, cid, "huge.txt", b"x" * 200_000), 413, "larger than 2048 bytes"),
        (_add_text(client, key, cid, "y" * 2049), 413, "larger than 2048 bytes"),
        (_add_text(client, key, cid, "   "), 422, "empty"),
        (_add_text(client, key, cid, "hi", content_type="application/pdf"), 422, "content_type"),
        (_add_text(client, key, cid, "hi", extra=1), 422, "unknown field"),
        (_add_text(client, key, cid, "hi", metadata={"nested": {"a": 1}}), 422, "metadata"),
        (client.post(base, json={"title": "no text"}, headers=auth(key)), 422, "text"),
        (client.post(base, data="plain words", content_type="text/plain", headers=auth(key)), 415, "multipart"),
        (client.post(base, data="{nope", content_type="application/json", headers=auth(key)), 400, "not valid JSON"),
        (_upload(client, key, cid, "a.txt", b"hi", metadata="{nope"), 422, "metadata"),
        (_upload(client, key, cid, "a.txt", b"hi", colour="red"), 422, "colour"),
        (client.post(base, data={"title": "no file"}, content_type="multipart/form-data", headers=auth(key)), 422,
         "`file`"),
    ]
    for response, status, words in cases:
        problem = _problem(response, status)
        assert words in problem["detail"], problem
    assert _stored(db, tenant_row.id) == (0, 0)
    assert api_redis.llen("ingest") == 0


@pytest.mark.parametrize("pdf,reason", [(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nnot really a pdf", "corrupt PDF"),
                                        (make_pdf([[], []]), "no extractable text")])
def test_an_unreadable_pdf_fails_with_its_reason_and_no_chunks(app, client, tenant, api_redis, db, pdf, reason):
    tenant_row, key = tenant
    collection = _collection(client, key)
    document = _upload(client, key, collection["id"], "scan.pdf", pdf).get_json()
    state = _ingest(app, tenant_row.id, document["id"])
    assert state["status"] == "failed" and reason in state["error"], state
    got = client.get(f"/v1/collections/{collection['id']}/documents/{document['id']}", headers=auth(key)).get_json()
    assert (got["status"], got["chunks_embedded"]) == ("failed", 0) and reason in got["error"]
    assert _stored(db, tenant_row.id) == (1, 0)


def test_a_refused_publish_stores_nothing_and_answers_503(app, client, tenant, db, monkeypatch):
    tenant_row, key = tenant
    collection = _collection(client, key)

    def broker_down(*args, **kwargs):
        raise kombu.exceptions.OperationalError("broker away")

    monkeypatch.setattr(_services(app).celery, "send_task", broker_down)
    response = _add_text(client, key, collection["id"], "lost on the way")
    assert _problem(response, 503)["detail"].startswith("the ingest queue is unreachable")
    assert response.headers["Retry-After"] == "5"
    assert _stored(db, tenant_row.id) == (0, 0)


@pytest.mark.parametrize("params,field", [
    ({"k": "0"}, "k"), ({"k": "101"}, "k"), ({"k": "many"}, "k"), ({"mode": "fuzzy"}, "mode"),
    ({"filter": "{nope"}, "filter"), ({"filter": "[1, 2]"}, "filter"), ({"q": ""}, "q"), ({"q": None}, "q"),
    ({"colour": "red"}, "colour")])
def test_bad_search_parameters_are_422_naming_the_parameter(client, tenant, params, field):
    _, key = tenant
    collection = _collection(client, key)
    query = {k: v for k, v in {"q": "anything", **params}.items() if v is not None}
    problem = _problem(_search(client, key, collection["id"], **query), 422)
    assert [e["field"] for e in problem["errors"]] == [field], problem


# --- tenants ------------------------------------------------------------------------------------------


def test_another_tenants_collections_and_documents_are_404_and_never_found(app, client, db):
    owner, key_a = tenants.create_tenant(db, f"rag-a-{uuid.uuid4().hex[:6]}")
    _, key_b = tenants.create_tenant(db, f"rag-b-{uuid.uuid4().hex[:6]}")
    theirs = _collection(client, key_a, "private")
    doc = _add_text(client, key_a, theirs["id"], "The vault code is kept in the lighthouse.").get_json()
    assert _ingest(app, owner.id, doc["id"])["status"] == "ready"
    mine = _collection(client, key_b, "private")  # the same name is fine for another tenant
    assert _add_text(client, key_b, mine["id"], "Nothing about vaults here, only gardens.").status_code == 202

    missing = "00000000-0000-4000-8000-000000000000"
    base = f"/v1/collections/{theirs['id']}"
    for method, path in [("get", base), ("delete", base), ("get", f"{base}/documents"),
                         ("get", f"{base}/documents/{doc['id']}"), ("delete", f"{base}/documents/{doc['id']}"),
                         ("get", f"/v1/collections/{mine['id']}/documents/{doc['id']}"),
                         ("get", f"{base}/search?q=vault"), ("get", f"/v1/collections/{missing}")]:
        problem = _problem(getattr(client, method)(path, headers=auth(key_b)), 404)
        assert problem["title"] == "Not Found"
    _problem(_add_text(client, key_b, theirs["id"], "sneaky"), 404)
    _problem(_upload(client, key_b, theirs["id"], "sneaky.txt", b"sneaky"), 404)
    assert [c["id"] for c in client.get("/v1/collections", headers=auth(key_b)).get_json()["data"]] == [mine["id"]]
    for mode in ("vector", "keyword", "hybrid"):
        hits = _search(client, key_b, mine["id"], q="vault code lighthouse", mode=mode).get_json()["data"]
        assert all(h["document_id"] != doc["id"] for h in hits), hits
    still = client.get(f"{base}/documents/{doc['id']}", headers=auth(key_a)).get_json()
    assert still["status"] == "ready"
    assert _search(client, key_a, theirs["id"], q="vault code").get_json()["data"][0]["document_id"] == doc["id"]


def test_a_collection_of_another_model_is_not_searched_by_vector(client, tenant, db):
    tenant_row, key = tenant
    with db.connection() as conn:
        other = store.create_collection(conn, tenant_row.id, "old-model", embedding_model="some-other-model",
                                        embedding_dim=768)
    problem = _problem(_search(client, key, other.id, q="anything", mode="vector"), 409)
    assert "some-other-model" in problem["detail"] and problem["title"] == "Embedding model mismatch"
    _problem(_search(client, key, other.id, q="anything", mode="hybrid"), 409)
    assert _search(client, key, other.id, q="anything", mode="keyword").status_code == 200  # no vectors compared
