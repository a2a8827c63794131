"""Documents whose ingestion stalled, sent to the `ingest` queue again (a step of the reconciler's sweep).

A document's updated_at moves with every batch of chunks its run stores. One `queued` or `processing`
with no progress for settings.ingest_stall_after seconds was stranded:
- `processing`: its worker died mid-run (SIGKILL, OOM, a lost machine). Its message sits unacknowledged
  in Redis until the visibility timeout (an hour) would deliver it again; a new message now lets the
  next run take the document over (store.claim_document: chunks of the dead run deleted, the run fenced
  out should it still be alive);
- `queued`, with no message for it waiting on the queue: the message was lost, or it had been taken
  by a worker that died before starting it.
A `queued` document whose message is still waiting is simply behind others, and is left alone. Each
document is sent at most once per stall period (a Redis key), so a backlog is never flooded with copies;
a copy that arrives while another run is making progress does nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from retrieval import store
from tasks.ingest.task import document_of, publish
from tasks.names import INGEST_QUEUE

log = logging.getLogger(__name__)

RESENT_KEY = "switchyard:ingest:resent:{}"


def resume_stalled(app, *, each: Callable[[], None] = lambda: None) -> int:
    """Send stalled documents to the ingest queue again; returns how many were sent. `each` is called
    before each send (the reconciler extends its lock there)."""
    stall_after = app.settings.ingest_stall_after
    with app.db.connection() as conn:
        stalled = store.stalled_documents(conn, stall_after)
    if not stalled:
        return 0
    waiting = waiting_documents(app) if any(d["status"] == "queued" for d in stalled) else set()
    sent = 0
    for document in stalled:
        if document["status"] == "queued" and str(document["id"]) in waiting:
            continue
        if not app.redis.set(RESENT_KEY.format(document["id"]), 1, nx=True, ex=max(1, int(stall_after))):
            continue
        each()
        log.warning("document %s: %s with no progress for %.0f s; sending it to the ingest queue again",
                    document["id"], document["status"], stall_after)
        publish(app, document)
        sent += 1
    return sent


def waiting_documents(app) -> set[str]:
    """Ids of the documents with an ingest message waiting on the queue (not yet taken by a worker)."""
    with app.connection_for_write() as conn:
        raw = conn.default_channel.client.lrange(INGEST_QUEUE, 0, -1)
    return {d for d in (document_of(str(json.loads(m).get("headers", {}).get("id", ""))) for m in raw) if d}
