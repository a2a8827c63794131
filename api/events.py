"""Server-sent events: following a job live (GET /v1/jobs/{id}/events, and OpenAI's `stream: true`).

The events themselves are written by the lifecycle and the GPU workers to the job's Redis stream
(tasks/jobs/events.py); here they are read and sent. A reader waits on the process's one Redis
subscription (api/waiter.py), so a stream holds a connection and a greenlet, never a thread, and counts
as one of the tenant's waits (SWITCHYARD_MAX_WAITS_PER_TENANT). One connection streams for at most
STREAM_SECONDS; the client then comes back with `Last-Event-ID` and misses nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import current_app, request

from api.errors import ApiError
from tasks.jobs import events
from tasks.jobs.status import JobStatus

STREAM_SECONDS = 590.0  # one connection's longest stream
KEEPALIVE_SECONDS = 15.0  # a comment line this often keeps proxies from closing a quiet stream
_FINAL_EVENT_GRACE = 2.0  # seconds a job ended in Postgres may take to show its final event

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def sse(data, *, event: str | None = None, event_id: str | None = None) -> str:
    """One server-sent event; `data` is sent as JSON unless it is a string."""
    lines = [f"id: {event_id}"] if event_id else []
    if event:
        lines.append(f"event: {event}")
    lines.append("data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))))
    return "\n".join(lines) + "\n\n"


KEEPALIVE = ": keep-alive\n\n"


def last_event_id() -> str | None:
    """Where a resumed stream starts: the `Last-Event-ID` header (or `?after=`), validated."""
    value = request.headers.get("Last-Event-ID") or request.args.get("after")
    if value is None:
        return None
    if not events.EVENT_ID.match(value):
        raise ApiError(400, "Invalid Last-Event-ID", f"`Last-Event-ID` must be the id of an event this stream sent "
                       f"(like 1764412345678-0), got {value!r}")
    return value


def follow(job_id, load_row, after: str | None = None) -> Iterator[tuple[str | None, dict | None]]:
    """(event id, event) for the job's events after `after`, oldest first, until its final status (or
    STREAM_SECONDS); (None, None) now and then while nothing happens (send a keep-alive). When the
    stream has nothing more but the job has ended (an expired stream, a lost write), its final status
    comes from Postgres, without an id. `load_row()` re-reads the job."""
    services = current_app.extensions["switchyard"]
    deadline, ended_in_db = time.monotonic() + STREAM_SECONDS, False
    with services.waiter.watch(str(job_id), channel=events.EVENTS_CHANNEL) as woken:
        while True:
            woken.clear()
            entries = events.read(services.redis, job_id, after)
            for event_id, event in entries:
                after = event_id
                yield event_id, event
                if event["type"] == "status" and JobStatus(event["status"]).is_terminal:
                    return
            if entries:
                continue
            row = load_row()
            if JobStatus(row["status"]).is_terminal:
                # The lifecycle writes the final event just after its commit: give it a moment to arrive.
                if not ended_in_db:
                    ended_in_db = True
                    woken.wait(_FINAL_EVENT_GRACE)
                    continue
                yield None, {"type": "status", "status": row["status"], "attempt": row["attempt"]}
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not woken.wait(min(KEEPALIVE_SECONDS, left)):
                yield None, None
