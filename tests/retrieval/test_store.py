"""Store, ingestion and search on real Postgres + pgvector with the real embedding model."""

from __future__ import annotations

import random
import uuid

import pytest

from retrieval import parsing, store
from retrieval.chunking import Chunk
from retrieval.embedding import Embedder
from retrieval.errors import CollectionExists, IngestionSuperseded, ModelMismatch, NotFound
from retrieval.ingestion import ingest_document
from retrieval.search import search, search_many
from tests.retrieval.support import make_pdf

MARKDOWN = parsing.MARKDOWN
GUIDE = "\n\n".join(f"## Part {i}\n\n" + " ".join(f"Section {i} sentence {j} about harbours and ferries."
                                                 for j in range(30)) for i in range(4))


def _add(conn, tenant_id, collection, text: str, **kw):
    kw.setdefault("title", "doc")
    kw.setdefault("content_type", MARKDOWN)
    return store.add_document(conn, tenant_id, collection.id, text.encode(), **kw)


def _chunk_count(conn, document_id) -> int:
    return conn.execute("SELECT count(*) AS n FROM chunks WHERE document_id = %s", (document_id,)).fetchone()["n"]


def test_same_content_is_stored_once(conn, tenant, collection, embedder):
    first, created = _add(conn, tenant[0].id, collection, "# Fenn\n\nThe ferry leaves at noon.")
    again, created_again = _add(conn, tenant[0].id, collection, "# Fenn\n\nThe ferry leaves at noon.",
                                title="another title")
    assert created and not created_again and again["id"] == first["id"]
    done = ingest_document(conn, embedder, tenant[0].id, first["id"])
    assert (done["status"], done["chunks_embedded"], done["chunks_total"]) == ("ready", 1, 1)
    assert ingest_document(conn, embedder, tenant[0].id, first["id"])["status"] == "ready"  # a duplicate run
    assert _chunk_count(conn, first["id"]) == 1
    with pytest.raises(CollectionExists):
        store.create_collection(conn, tenant[0].id, collection.name, embedding_model="m", embedding_dim=3)


def test_another_tenants_collections_documents_and_chunks_are_invisible(conn, db, collection, embedder):
    from tasks.jobs import tenants

    mine, _ = tenants.create_tenant(db, f"mine-{uuid.uuid4().hex[:8]}")
    own = store.create_collection(conn, mine.id, collection.name, embedding_model=embedder.model_name,
                                  embedding_dim=embedder.dimension)
    secret, _ = _add(conn, collection.tenant_id, collection, "The vault code of the other tenant is 4711.")
    ingest_document(conn, embedder, collection.tenant_id, secret["id"])
    visible, _ = _add(conn, mine.id, own, "Our own note about the vault.")
    ingest_document(conn, embedder, mine.id, visible["id"])
    for mode in ("vector", "keyword", "hybrid"):
        hits = search(conn, embedder, mine.id, [own.id], "vault code 4711", k=10, mode=mode)
        assert {h.document_id for h in hits} <= {visible["id"]}
        with pytest.raises(NotFound):
            search(conn, embedder, mine.id, [collection.id], "vault code", mode=mode)
    with pytest.raises(NotFound):
        store.get_document(conn, mine.id, secret["id"])
    with pytest.raises(NotFound):
        store.delete_document(conn, mine.id, secret["id"])
    with pytest.raises(NotFound):
        ingest_document(conn, embedder, mine.id, secret["id"])
    assert [c.id for c in store.list_collections(conn, mine.id)] == [own.id]


def test_a_collection_is_never_searched_with_another_models_vectors(conn, tenant, embedder):
    other = store.create_collection(conn, tenant[0].id, "e5", embedding_model="intfloat/e5-small-v2",
                                    embedding_dim=384)
    with pytest.raises(ModelMismatch):
        search(conn, embedder, tenant[0].id, [other.id], "anything", mode="hybrid")
    wider = store.create_collection(conn, tenant[0].id, "wide", embedding_model=embedder.model_name,
                                    embedding_dim=768)
    with pytest.raises(ModelMismatch):
        search(conn, embedder, tenant[0].id, [wider.id], "anything", mode="vector")
    doc, _ = _add(conn, tenant[0].id, other, "text for another model")
    with pytest.raises(ModelMismatch):
        ingest_document(conn, embedder, tenant[0].id, doc["id"])
    assert store.get_document(conn, tenant[0].id, doc["id"])["status"] == "queued"
    assert search(conn, embedder, tenant[0].id, [other.id], "anything", mode="keyword") == []  # no vectors read


def test_deleting_removes_chunks_and_the_collections_index(conn, tenant, collection, embedder):
    doc, _ = _add(conn, tenant[0].id, collection, "# Gone\n\nSoon deleted.")
    kept, _ = _add(conn, tenant[0].id, collection, "# Kept\n\nStays a while.")
    for d in (doc, kept):
        ingest_document(conn, embedder, tenant[0].id, d["id"])
    store.delete_document(conn, tenant[0].id, doc["id"])
    assert _chunk_count(conn, doc["id"]) == 0 and _chunk_count(conn, kept["id"]) == 1
    assert [d["id"] for d in store.list_documents(conn, tenant[0].id, collection.id)] == [kept["id"]]
    store.delete_collection(conn, tenant[0].id, collection.id)
    assert _chunk_count(conn, kept["id"]) == 0
    assert conn.execute("SELECT to_regclass(%s) AS i", (store.hnsw_index_name(collection.id),)).fetchone()["i"] is None
    with pytest.raises(NotFound):
        store.delete_collection(conn, tenant[0].id, collection.id)


def test_a_filter_matching_one_percent_of_rows_still_returns_k(conn, tenant, collection, embedder):
    """2000 chunks (cheap random unit vectors, inserted directly) in 100 documents; the filter keeps
    one document's 20. The planner is kept off every plan but the HNSW index scan (the only path that
    yields rows already ordered by distance, once sorting is off), so the HNSW scan must find them:
    with ef_search 40 a plain scan would see ~0.4 of them; the iterative scan walks on until k."""
    rng = random.Random(7)

    def unit():
        v = [rng.gauss(0, 1) for _ in range(embedder.dimension)]
        norm = sum(x * x for x in v) ** 0.5
        return [x / norm for x in v]

    for group in range(100):
        doc, _ = _add(conn, tenant[0].id, collection, f"group {group}", metadata={"group": group})
        claimed = store.claim_document(conn, tenant[0].id, doc["id"])
        chunks = [Chunk(i, f"g{group} c{i}", 0, 1, (), None, "", 1) for i in range(20)]
        store.set_chunks_total(conn, doc["id"], claimed["attempt"], len(chunks))
        store.insert_chunks(conn, claimed, claimed["attempt"], chunks, [unit() for _ in chunks], claimed["metadata"])
        assert store.mark_ready(conn, doc["id"], claimed["attempt"])
    conn.execute("ANALYZE chunks")
    off = ("enable_seqscan", "enable_bitmapscan", "enable_sort")
    for name in off:
        conn.execute(f"SET {name} = off")
    try:
        hits = search(conn, embedder, tenant[0].id, [collection.id], "anything", k=10, mode="vector",
                      filter={"group": 42})
        assert len(hits) == 10 and {h.metadata["group"] for h in hits} == {42}
        # The control: the same HNSW scan without iterating stops after ef_search (40) candidates,
        # which hold (almost) none of the 20 rows the filter keeps.
        with conn.transaction():
            conn.execute("SET LOCAL hnsw.iterative_scan = off")
            plain = conn.execute(
                f"""SELECT c.id FROM chunks c WHERE c.collection_id = '{collection.id}' AND c.metadata @> %s
                     ORDER BY (c.embedding::vector(384)) <=> %s::vector(384) LIMIT 10""",
                ('{"group": 42}', store.vector_literal(unit()))).fetchall()
        assert len(plain) < 10
    finally:
        for name in off:
            conn.execute(f"RESET {name}")
    assert len(search(conn, embedder, tenant[0].id, [collection.id], "anything", k=10, filter={"group": 42})) == 10


class _DiesAfter(Embedder):
    """The real model, in a worker that is killed after embedding `batches` batches."""

    def __init__(self, real: Embedder, batches: int):
        self.__dict__.update(real.__dict__)
        self.left = batches

    def embed_documents(self, texts):
        if self.left == 0:
            raise SystemExit("worker killed")
        self.left -= 1
        return super().embed_documents(texts)


def test_a_crash_mid_ingestion_leaves_no_ready_document(conn, tenant, collection, embedder):
    doc, _ = _add(conn, tenant[0].id, collection, GUIDE, metadata={"kind": "guide"})
    with pytest.raises(SystemExit):
        ingest_document(conn, _DiesAfter(embedder, 1), tenant[0].id, doc["id"], chunk_tokens=64, overlap=8,
                        batch_size=2)
    left = store.get_document(conn, tenant[0].id, doc["id"])
    assert left["status"] == "processing" and left["chunks_embedded"] == 2 < left["chunks_total"]
    assert _chunk_count(conn, doc["id"]) == 2
    assert search(conn, embedder, tenant[0].id, [collection.id], "harbours and ferries", k=5) == []
    done = ingest_document(conn, embedder, tenant[0].id, doc["id"], chunk_tokens=64, overlap=8, batch_size=2)
    assert done["status"] == "ready" and done["chunks_embedded"] == done["chunks_total"] > 2
    ordinals = [r["ordinal"] for r in conn.execute(
        "SELECT ordinal FROM chunks WHERE document_id = %s ORDER BY ordinal", (doc["id"],))]
    assert ordinals == list(range(done["chunks_total"]))
    hits = search(conn, embedder, tenant[0].id, [collection.id], "Section 2 harbours", k=3)
    assert hits and hits[0].metadata["kind"] == "guide" and hits[0].heading_path == ["Part 2"]


@pytest.mark.parametrize("data, content_type, reason", [
    (b"%PDF-1.4\ngarbage\n%%EOF", parsing.PDF, "corrupt PDF"),
    (make_pdf([[]]), parsing.PDF, "no extractable text"),
    (b"<html><body><script>1</script></body></html>", parsing.HTML, "no text"),
])
def test_a_failed_document_keeps_its_error_and_no_chunks(conn, tenant, collection, embedder, data,
                                                         content_type, reason):
    doc, _ = store.add_document(conn, tenant[0].id, collection.id, data, title="bad", content_type=content_type)
    failed = ingest_document(conn, embedder, tenant[0].id, doc["id"])
    assert failed["status"] == "failed" and reason in failed["error"]
    assert _chunk_count(conn, doc["id"]) == 0


def test_pdf_chunks_carry_their_page_and_queries_embed_together(conn, tenant, collection, embedder):
    pdf = make_pdf([["The lighthouse keeper lit the lamp at dusk."], ["The miller ground barley at dawn."]])
    doc, _ = store.add_document(conn, tenant[0].id, collection.id, pdf, title="two pages",
                                content_type=parsing.PDF, source_filename="two.pdf")
    assert ingest_document(conn, embedder, tenant[0].id, doc["id"])["status"] == "ready"
    lamp, barley = search_many(conn, embedder, tenant[0].id, [collection.id],
                               ["who lit the lamp", "grinding grain"], k=1, mode="vector")
    assert (lamp[0].page, barley[0].page) == (1, 2)
    assert lamp[0].text == "The lighthouse keeper lit the lamp at dusk."
    assert search(conn, embedder, tenant[0].id, [collection.id], "barley", k=2, filter={"page": 2},
                  mode="keyword")[0].page == 2


def test_keyword_search_takes_any_word_and_honours_exclusions_and_phrases(conn, tenant, collection, embedder):
    texts = {"salmon": "Salmon returned to the river after the ladders were built.",
             "trout": "Trout live in the lake, not in the river.",
             "mill": "The paper mill draws water from the river."}
    ids = {}
    for key, text in texts.items():
        doc, _ = _add(conn, tenant[0].id, collection, text, content_type=parsing.TEXT)
        ingest_document(conn, embedder, tenant[0].id, doc["id"])
        ids[doc["id"]] = key

    def found(query):
        return [ids[h.document_id] for h in search(conn, embedder, tenant[0].id, [collection.id], query, k=5,
                                                   mode="keyword")]

    assert found("when did the salmon come back")[0] == "salmon"  # not every word needs to match
    assert set(found("river -trout")) == {"salmon", "mill"}
    assert found('"paper mill"') == ["mill"]
    assert found("the of and") == []  # only stop words: nothing to match


def test_a_superseded_run_writes_nothing_more(conn, tenant, collection):
    """A run that is still alive after a newer run claimed the document (a redelivered task) is fenced."""
    doc, _ = _add(conn, tenant[0].id, collection, "fenced text")
    old = store.claim_document(conn, tenant[0].id, doc["id"])
    new = store.claim_document(conn, tenant[0].id, doc["id"])
    assert new["attempt"] == old["attempt"] + 1
    chunk = Chunk(0, "fenced text", 0, 11, (), None, "fenced text", 4)
    with pytest.raises(IngestionSuperseded):
        store.insert_chunks(conn, old, old["attempt"], [chunk], [[1.0] + [0.0] * 383], {})
    assert not store.mark_ready(conn, doc["id"], old["attempt"])
    assert _chunk_count(conn, doc["id"]) == 0


def test_a_run_making_progress_is_not_taken_over_until_it_stalls(conn, tenant, collection):
    """A duplicate message (stalled_after given) leaves a healthy run alone; once the run has stored
    nothing for stalled_after seconds, the next claim takes the document over and drops its chunks."""
    doc, _ = _add(conn, tenant[0].id, collection, "watched text")
    first = store.claim_document(conn, tenant[0].id, doc["id"])
    chunk = Chunk(0, "watched text", 0, 12, (), None, "watched text", 4)
    store.set_chunks_total(conn, doc["id"], first["attempt"], 2)
    store.insert_chunks(conn, first, first["attempt"], [chunk], [[1.0] + [0.0] * 383], {})
    assert store.claim_document(conn, tenant[0].id, doc["id"], stalled_after=60) is None
    assert store.get_document(conn, tenant[0].id, doc["id"])["chunks_embedded"] == 1
    conn.execute("UPDATE documents SET updated_at = now() - interval '61 seconds' WHERE id = %s", (doc["id"],))
    assert [d["id"] for d in store.stalled_documents(conn, 60) if d["id"] == doc["id"]] == [doc["id"]]
    taken = store.claim_document(conn, tenant[0].id, doc["id"], stalled_after=60)
    assert taken["attempt"] == first["attempt"] + 1 and _chunk_count(conn, doc["id"]) == 0
    assert not [d for d in store.stalled_documents(conn, 60) if d["id"] == doc["id"]]
