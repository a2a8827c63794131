"""Admission: how many requests one API worker works on at once (SWITCHYARD_API_ACTIVE_REQUESTS).

A gevent worker takes up to SWITCHYARD_API_WORKER_CONNECTIONS connections, each a greenlet. Were all
of them to work at once, a burst (5,000 users submitting together) would put thousands of greenlets in
line for the Redis and Postgres pools, whose timeouts are there to notice an outage: on a busy machine
the line outlasted them and clients got 503s though nothing was down. So a request works only while it
holds one of the worker's slots, taken in arrival order before it touches Redis or Postgres; the others
wait for a slot with no timeout of ours (the client's own decides), holding only their connection.

A request gives its slot back while it waits for a job to finish (long-poll, the OpenAI endpoints'
wait) and takes one again to answer (`released`); an event stream sends its events after its slot is
given back. Health checks take no slot: a probe must answer while a burst waits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import has_request_context, request

ENVIRON_KEY = "switchyard.admission"
UNMETERED = frozenset({"/healthz", "/readyz"})


class _Slot:
    """One request's hold on a slot (in its WSGI environ)."""

    def __init__(self, slots: threading.Semaphore):
        self._slots, self.held = slots, False

    def take(self) -> None:
        self._slots.acquire()
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()


class Admission:
    """WSGI middleware around the Flask app: at most `limit` requests of this process work at once.
    Under gunicorn's gevent worker `threading` is gevent's, so a waiting request is a parked greenlet."""

    def __init__(self, wsgi_app, limit: int):
        self.wsgi_app, self.limit = wsgi_app, limit
        self._slots = threading.BoundedSemaphore(limit)

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") in UNMETERED:
            return self.wsgi_app(environ, start_response)
        slot = environ[ENVIRON_KEY] = _Slot(self._slots)
        slot.take()
        try:
            # A streamed body (server-sent events) is sent after this returns, outside the slot.
            return self.wsgi_app(environ, start_response)
        finally:
            slot.give_back()


@contextmanager
def released() -> Iterator[None]:
    """Give the current request's slot back for the block (a wait on a job), and take one again, in
    line with the other requests, after it. Outside an admitted request (tests, the CLI): nothing."""
    slot = request.environ.get(ENVIRON_KEY) if has_request_context() else None
    if slot is None or not slot.held:
        yield
        return
    slot.give_back()
    try:
        yield
    finally:
        slot.take()
