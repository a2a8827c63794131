"""A job's events: what a client following it live reads (GET /v1/jobs/{id}/events, OpenAI streaming).

Each job has a Redis stream, `switchyard:events:<job id>`. Redis gives each entry an id that only grows,
and that id is the server-sent event's id: a client that lost its connection comes back with
`Last-Event-ID` and reads on from there, missing and repeating nothing.

Entries (the `e` field, JSON):
- `{"type": "status", "status": "running", "attempt": n}` when an attempt starts on a node;
- `{"type": "delta", "attempt": n, "text": "..."}` as the engine produces text, for jobs submitted with
  `stream: true` (the text of other jobs comes with their result);
- `{"type": "status", "status": <terminal>, "attempt": n}` when the job ends, and
  `{"type": "status", "status": "queued", "attempt": n + 1}` when it is to be tried again: a new
  attempt streams from its beginning, so a reader drops what the failed attempt had sent.
Every write is announced on EVENTS_CHANNEL (the job id), which wakes the API's readers.

A stream is capped at MAX_ENTRIES (approximately) and expires TTL seconds after its last write; Postgres
keeps the job itself, so a reader that comes late still learns how it ended.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "switchyard:jobs:events"
TTL = 3600
MAX_ENTRIES = 20_000
_KEY = "switchyard:events:{}"
#: an event id as Redis makes them (what a client may send back as Last-Event-ID)
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_FLUSH_SECONDS = 0.02  # deltas are written to Redis together at most this often


def key(job_id) -> str:
    return _KEY.format(job_id)


def add(pipe, job_id, event: dict) -> None:
    """Queue one event's write on a Redis pipeline (announce() it after)."""
    pipe.xadd(key(job_id), {"e": json.dumps(event, separators=(",", ":"))}, maxlen=MAX_ENTRIES, approximate=True)


def announce(pipe, job_id) -> None:
    """Queue the stream's new expiry and the announcement that wakes its readers."""
    pipe.expire(key(job_id), TTL)
    pipe.publish(EVENTS_CHANNEL, str(job_id))


def status(pipe, job_id, status: str, attempt: int) -> None:
    """Queue a status event, announced."""
    add(pipe, job_id, {"type": "status", "status": status, "attempt": attempt})
    announce(pipe, job_id)


def read(redis, job_id, after: str | None = None, count: int = 1000) -> list[tuple[str, dict]]:
    """The events after `after` (an event id; None: from the start), oldest first, at most `count`."""
    entries = redis.xrange(key(job_id), min=f"({after}" if after else "-", count=count)
    return [((i.decode() if isinstance(i, bytes) else i), json.loads(fields[b"e"] if b"e" in fields else fields["e"]))
            for i, fields in entries]


class DeltaWriter:
    """Writes text deltas from an engine's event loop without ever blocking it: `delta()` only queues;
    a thread writes what has queued every _FLUSH_SECONDS, in one pipeline. Call `flush()` before a
    job's final status is written, so that its last words come before its end. A Redis error loses
    those deltas (logged), never the job: its result is recorded as usual."""

    def __init__(self, redis):
        self._redis = redis
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = threading.Event()
        self._lock = threading.Lock()  # one writer at a time: deltas reach Redis in the order queued
        threading.Thread(target=self._run, name="event-writer", daemon=True).start()

    def delta(self, job: dict, text: str) -> None:
        if text:
            self._queue.put((job["id"], job["attempt"], text))
            self._queued.set()

    def _run(self) -> None:
        while True:
            self._queued.wait()
            time.sleep(_FLUSH_SECONDS)  # let a step's worth of deltas gather
            self.flush()

    def flush(self) -> None:
        """Write every delta queued so far, now."""
        with self._lock:
            self._queued.clear()
            pending = []
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            if not pending:
                return
            try:
                with self._redis.pipeline(transaction=False) as pipe:
                    for job_id, attempt, text in pending:
                        add(pipe, job_id, {"type": "delta", "attempt": attempt, "text": text})
                    for job_id in {p[0] for p in pending}:
                        announce(pipe, job_id)
                    pipe.execute()
            except Exception as exc:  # noqa: BLE001 - streaming is best effort; the result is not
                log.warning("could not write %d text delta(s) (%r)", len(pending), exc)
