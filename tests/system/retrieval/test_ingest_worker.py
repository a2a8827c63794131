"""Documents uploaded through the API are ingested by a real ingest worker process and found by search;
stopping the worker leaves no process behind."""

from __future__ import annotations

import io
import signal
import sys
import time

import psutil

from ops import processes
from tasks.celery_app import create_celery
from tasks.ingest import recovery
from tasks.jobs.reconciler import Reconciler
from tests.retrieval.support import make_pdf
from tests.support import auth

HANDBOOK = """# Lighthouse handbook

## Lamps

The keeper trims the wick of the great lamp every evening at dusk.
"""
RECIPES = """<html><head><title>Recipes</title></head><body><h1>Bread</h1>
<p>Knead the dough for ten minutes, then let it rise overnight in a cool larder.</p></body></html>"""
PDF_LINES = [["Glaciers carve deep valleys as they slowly move downhill."]]


def _documents(client, key, collection_id) -> list[dict]:
    response = client.get(f"/v1/collections/{collection_id}/documents", headers=auth(key))
    assert response.status_code == 200
    return response.get_json()["data"]


def test_the_worker_ingests_uploads_and_search_finds_them_then_it_stops_cleanly(client, tenant, ingest_worker):
    _, key = tenant
    collection = client.post("/v1/collections", json={"name": "library"}, headers=auth(key)).get_json()
    base = f"/v1/collections/{collection['id']}/documents"
    uploads = [
        client.post(base, json={"title": "handbook", "text": HANDBOOK, "content_type": "text/markdown"},
                    headers=auth(key)),
        client.post(base, json={"title": "recipes", "text": RECIPES, "content_type": "text/html"}, headers=auth(key)),
        client.post(base, data={"file": (io.BytesIO(make_pdf(PDF_LINES)), "glaciers.pdf")},
                    content_type="multipart/form-data", headers=auth(key)),
    ]
    assert [u.status_code for u in uploads] == [202, 202, 202], [u.get_json() for u in uploads]
    ids = {u.get_json()["title"]: u.get_json()["id"] for u in uploads}

    started = time.monotonic()
    docs = ingest_worker.wait_until(
        lambda: (d := _documents(client, key, collection["id"])) and all(x["status"] == "ready" for x in d) and d,
        120, "3 documents ready")
    print(f"3 documents ready {time.monotonic() - started:.1f} s after upload")
    assert len(docs) == 3
    assert all(d["chunks_total"] == d["chunks_embedded"] > 0 and d["error"] is None for d in docs), docs

    for query, title in (("who trims the wick of the lamp", "handbook"), ("how long to knead dough", "recipes"),
                         ("glaciers carving valleys", "glaciers.pdf")):
        for mode in ("vector", "hybrid"):
            response = client.get(f"/v1/collections/{collection['id']}/search",
                                  query_string={"q": query, "mode": mode, "k": 3}, headers=auth(key))
            assert response.status_code == 200, response.get_json()
            top = response.get_json()["data"][0]
            assert top["document_id"] == ids[title] and top["score"] > 0, (query, mode, top)

    pid = ingest_worker.pid("ingest")
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    assert ingest_worker.stop() == ["ingest"]
    assert not any(processes.alive(p) for p in tree), tree
    assert processes.group_members(pid) == []


def test_a_worker_killed_mid_document_leaves_it_unsearchable_and_the_next_worker_finishes_it(
        client, tenant, ingest_worker, ingest_settings, db):
    """SIGKILL to the ingest worker's process group half way through a long document: the document
    stays `processing` with part of its chunks, invisible to search; a reconciler sweep sends it again
    once it has stalled, and a new worker takes it over and indexes it exactly once."""
    _, key = tenant
    collection = client.post("/v1/collections", json={"name": "long"}, headers=auth(key)).get_json()
    sections = [f"## Section {i}\n\n" + " ".join(f"Harbour {i} log line {j}: the tide turned at the {j}th bell "
                                                 f"and the pilot boat went out to meet ship {i}-{j}."
                                                 for j in range(40)) for i in range(30)]
    upload = client.post(f"/v1/collections/{collection['id']}/documents",
                         json={"title": "harbour log", "text": "# Harbour log\n\n" + "\n\n".join(sections),
                               "content_type": "text/markdown"}, headers=auth(key))
    assert upload.status_code == 202, upload.get_json()
    doc_url = f"/v1/collections/{collection['id']}/documents/{upload.get_json()['id']}"

    half_way = ingest_worker.wait_until(
        lambda: (d := client.get(doc_url, headers=auth(key)).get_json())["chunks_embedded"] >= 16 and d, 120,
        "the document half ingested", interval=0.05)
    ingest_worker.signal("ingest", signal.SIGKILL)
    ingest_worker.wait_exit("ingest", 10)
    left = client.get(doc_url, headers=auth(key)).get_json()
    print(f"killed at {left['chunks_embedded']} / {left['chunks_total']} chunks")
    assert half_way["chunks_total"] > left["chunks_embedded"] > 0 and left["status"] == "processing", left
    search = f"/v1/collections/{collection['id']}/search"
    assert client.get(search, query_string={"q": "pilot boat", "mode": "keyword"},
                      headers=auth(key)).get_json()["data"] == []  # half-indexed: invisible

    app = create_celery(ingest_settings)
    app.db = db
    time.sleep(ingest_settings.ingest_stall_after + 0.5)
    assert Reconciler(app).sweep()["documents_resent"] >= 1  # the session's database holds other tests' too
    assert left["id"] in recovery.waiting_documents(app)
    ingest_worker.start("ingest", [sys.executable, "-m", "workers.ingest_worker"])
    done = ingest_worker.wait_until(
        lambda: (d := client.get(doc_url, headers=auth(key)).get_json())["status"] == "ready" and d, 180,
        "the document ready after the restart")
    with db.connection() as conn:
        ordinals = [r["ordinal"] for r in conn.execute(
            "SELECT ordinal FROM chunks WHERE document_id = %s ORDER BY ordinal", (done["id"],)).fetchall()]
    assert ordinals == list(range(done["chunks_total"])) and done["chunks_embedded"] == done["chunks_total"]
    hits = client.get(search, query_string={"q": "pilot boat ship 7-3", "mode": "keyword"}, headers=auth(key))
    assert hits.get_json()["data"], hits.get_json()
