"""A RAG job end to end: a collection and its documents made over the stack's HTTP API, ingested (the
ingest task's function, in-process, against the stack's database), then a job with `rag` answered by
the real vLLM worker, whose retrieval phase (its embedder loaded at boot) cites the right document."""

from __future__ import annotations

from datetime import datetime

from tasks.db import make_pool
from tasks.ingest.task import ingest, settings_embedder
from tests.system.engine.test_job_path import submit, wait_for

DOCUMENTS = {
    "zorblax": "The Zorblax is a small bird of the Kelvari islands. Its feathers are bright teal, and it sings "
               "only at dawn.",
    "bridges": "The harbour bridge was built of riveted steel in 1932 and is repainted grey every seven years.",
    "bread": "Sourdough bread rises slowly because wild yeast ferments the dough over many hours.",
}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_a_rag_job_cites_the_document_that_holds_the_fact(stack, http, base_settings):
    collection = http.post(f"{stack.api}/v1/collections", json={"name": "facts"}, timeout=30)
    assert collection.status_code == 201, collection.text
    collection_id = collection.json()["id"]
    ids = {}
    for title, text in DOCUMENTS.items():
        added = http.post(f"{stack.api}/v1/collections/{collection_id}/documents", json={"title": title, "text": text},
                          timeout=30)
        assert added.status_code == 202, added.text
        ids[title] = added.json()["id"]
    with make_pool(stack.env["DATABASE_URL"], max_size=1, name="rag-e2e") as pool:
        with pool.connection() as conn:
            tenant_id = conn.execute("SELECT tenant_id FROM collections WHERE id = %s",
                                     (collection_id,)).fetchone()["tenant_id"]
        for document_id in ids.values():
            assert ingest(pool, settings_embedder(base_settings), base_settings, str(tenant_id), document_id) == "ready"

    job = submit(stack, http, {
        "messages": [{"role": "user", "content": "What colour are the feathers of the Zorblax?"}],
        "temperature": 0, "max_tokens": 48, "rag": {"collections": [collection_id], "top_k": 3}})
    done = wait_for(stack, http, job["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["citations"], result
    first = result["citations"][0]
    assert first["n"] == 1 and first["document_id"] == ids["zorblax"] and first["title"] == "zorblax"
    assert "teal" in first["snippet"] and first["char_start"] < first["char_end"]
    assert result["retrieval"]["found"] >= 1 and result["text"].strip()
    assert result["usage"]["prompt_tokens"] + 48 <= base_settings.max_model_len
    assert (ts(done["created_at"]) <= ts(done["retrieval_started_at"]) <= ts(done["retrieved_at"])
            <= ts(done["finished_at"]))
    assert ts(done["started_at"]) <= ts(done["retrieval_started_at"])

    nothing = submit(stack, http, {"prompt": "Zzqx vvyt?", "max_tokens": 8, "temperature": 0,
                                   "rag": {"collections": [collection_id], "mode": "keyword"}})
    answered = wait_for(stack, http, nothing["id"])
    assert answered["status"] == "succeeded", answered["error"]
    assert answered["result"]["citations"] == [] and answered["result"]["retrieval"]["found"] == 0
