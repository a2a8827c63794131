"""The ingest task: one stored document parsed, chunked, embedded and indexed, on the `ingest` queue.

The task is thin: the work, its crash safety and its fencing are retrieval.ingestion's. Here: a pool
connection, the process's embedder, and what to do with each outcome. A short Postgres or Redis outage
is retried by Celery (the retry claims the document again, which deletes whatever the interrupted run
had written); a parse error leaves the document `failed` with its reason (ingest_document records it);
a run superseded by a newer one, or a document deleted meanwhile, is dropped.
"""

from __future__ import annotations

import logging
import uuid

from celery import shared_task

from retrieval import store
from retrieval.embedding import Embedder, embedder_for
from retrieval.errors import IngestionSuperseded, ModelMismatch, NotFound
from retrieval.ingestion import ingest_document
from tasks.errors import TRANSIENT
from tasks.names import INGEST_QUEUE, INGEST_TASK
from tasks.settings import Settings

log = logging.getLogger(__name__)


def settings_embedder(settings: Settings) -> Embedder:
    """The process's one embedder for the configured model (its weights load on first use)."""
    path = settings.embedding_model_path
    return embedder_for(settings.embedding_model, str(path) if path else None)


def publish(app, document: dict) -> None:
    """Put a stored document's ingest message on the `ingest` queue. Raises if the broker is unreachable.
    The task id names the document, so the reconciler can tell which documents have a message waiting."""
    app.send_task(INGEST_TASK, args=[str(document["tenant_id"]), str(document["id"])], queue=INGEST_QUEUE,
                  task_id=message_id(document["id"]))


def message_id(document_id) -> str:
    return f"document:{document_id}:{uuid.uuid4().hex[:12]}"


def document_of(message_id: str) -> str | None:
    """The document id an ingest message's task id names (None for another kind of id)."""
    parts = message_id.split(":")
    return parts[1] if len(parts) == 3 and parts[0] == "document" else None


def ingest(pool, embedder: Embedder, settings: Settings, tenant_id: str, document_id: str, *,
           take_over: bool = False) -> str:
    """Index one document; returns how it ended (`ready`, `failed`, or why nothing was done: a run
    already at work on it is left alone unless it has stalled, or unless `take_over`)."""
    try:
        with pool.connection() as conn:
            document = ingest_document(conn, embedder, tenant_id, document_id, chunk_tokens=settings.chunk_tokens,
                                       overlap=settings.chunk_overlap, batch_size=settings.embedding_batch_size,
                                       stalled_after=None if take_over else settings.ingest_stall_after)
    except IngestionSuperseded:
        log.info("document %s: a newer ingestion run took over; this one stops", document_id)
        return "superseded"
    except NotFound:
        log.info("document %s: deleted before it was ingested", document_id)
        return "missing"
    except ModelMismatch as exc:
        # Permanent: every ingest worker embeds with the configured model, so no retry can cure it.
        log.error("document %s not ingested: %s", document_id, exc)
        return _fail(pool, tenant_id, document_id, str(exc))
    if document["status"] == "processing":
        log.info("document %s: another run is at work on it; this message is dropped", document_id)
        return "busy"
    log.info("document %s: %s (%s chunks)", document_id, document["status"], document["chunks_total"])
    return document["status"]


def _fail(pool, tenant_id, document_id, reason: str) -> str:
    """Leave the document `failed` with `reason` (claimed first: only a run's own claim may end it)."""
    with pool.connection() as conn:
        claimed = store.claim_document(conn, tenant_id, document_id)
        if claimed is None:
            return "ready"
        store.mark_failed(conn, document_id, claimed["attempt"], reason)
    return "failed"


# acks_late: a worker that dies mid-document leaves the message to be delivered again, and the next run
# claims the document under a new attempt (never half-indexed and marked ready); Redis redelivers it
# only after the visibility timeout, so the reconciler sends a new one sooner (tasks/ingest/recovery.py).
# A retry follows this message's own run, which has ended: it takes the document over at once.
@shared_task(name=INGEST_TASK, bind=True, queue=INGEST_QUEUE, acks_late=True, ignore_result=True, max_retries=10,
             autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, retry_jitter=True)
def ingest_task(self, tenant_id: str, document_id: str) -> str:
    return ingest(self.app.db, settings_embedder(self.app.settings), self.app.settings, tenant_id, document_id,
                  take_over=self.request.retries > 0)
