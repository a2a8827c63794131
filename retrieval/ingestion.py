"""One document from stored bytes to searchable chunks: parse, chunk, embed in batches, insert.

Crash safety without one giant transaction: progress is committed batch by batch (so clients can watch
chunks_embedded grow), but the document only becomes `ready` in a final conditional update that checks
every counted chunk is stored, and search reads chunks of `ready` documents only. A run that dies
mid-way leaves the document `processing` with some chunks, invisible to search; the next run (the
task's retry, or the one the reconciler sends once the document has made no progress for a while:
tasks/ingest/recovery.py) claims it under a new attempt number, which deletes those chunks first and
fences the dead run out should it still be writing.
"""

from __future__ import annotations

import logging

from retrieval import store
from retrieval.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS, chunk_document
from retrieval.embedding import check_model
from retrieval.errors import ParseError
from retrieval.parsing import parse

log = logging.getLogger(__name__)


def ingest_document(conn, embedder, tenant_id, document_id, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    overlap: int = DEFAULT_OVERLAP_TOKENS, batch_size: int = 64,
                    stalled_after: float | None = None) -> dict:
    """Index a stored document and return it as it ends: `ready`, or `failed` with the parse error.
    A document already `ready` is left alone (a duplicate task message does nothing), and so is one
    that another run is making progress on, given `stalled_after` (see store.claim_document). Errors
    other than ParseError (database, model) propagate: they are worth a retry, which starts over."""
    document = store.get_document(conn, tenant_id, document_id)
    check_model(embedder, store.get_collections(conn, tenant_id, [document["collection_id"]])[0])
    claimed = store.claim_document(conn, tenant_id, document_id, stalled_after=stalled_after)
    if claimed is None:
        return store.get_document(conn, tenant_id, document_id)
    attempt = claimed["attempt"]
    try:
        parsed = parse(bytes(claimed["content"]), claimed["content_type"])
        chunks = chunk_document(parsed, embedder.tokenizer, max_tokens=chunk_tokens, overlap=overlap)
    except ParseError as e:
        store.mark_failed(conn, document_id, attempt, str(e))
        return store.get_document(conn, tenant_id, document_id)
    store.set_chunks_total(conn, document_id, attempt, len(chunks))
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i:i + batch_size]
        vectors = embedder.embed_documents([c.embed_text for c in batch])
        store.insert_chunks(conn, claimed, attempt, batch, vectors, claimed["metadata"])
    if not store.mark_ready(conn, document_id, attempt):
        log.warning("document %s: attempt %s lost its claim before finishing", document_id, attempt)
    return store.get_document(conn, tenant_id, document_id)
