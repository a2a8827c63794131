"""Long-poll and stream support: one Redis subscriber thread per API process wakes every request waiting
on a job: long-polls when it finishes (FINISHED_CHANNEL), event streams when it has new events
(tasks.jobs.events.EVENTS_CHANNEL).

A waiter registers its event *before* re-reading the job from Postgres, so a job that finishes in
between is seen either by the read or by the notification. When the subscription drops, every waiter
is woken to re-read Postgres; none sleeps through a lost message for longer than that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import redis

from tasks.jobs.events import EVENTS_CHANNEL
from tasks.jobs.notify import FINISHED_CHANNEL

_CHANNELS = (FINISHED_CHANNEL, EVENTS_CHANNEL)

log = logging.getLogger(__name__)


class JobWaiter:
    def __init__(self, redis_url: str):
        self._redis_url = redis_url
        self._events: dict[tuple[str, str], set[threading.Event]] = defaultdict(set)  # (channel, job id) →
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, job_id: str, timeout: float = 5.0, channel: str = FINISHED_CHANNEL):
        """Yield an Event set when `job_id` finishes, or with `channel=EVENTS_CHANNEL` when it has new
        events (and whenever the subscription had to be renewed)."""
        self._ensure_listener()
        if not self._subscribed.wait(timeout):
            raise redis.ConnectionError("could not subscribe to job notifications")
        event, key = threading.Event(), (channel, job_id)
        with self._lock:
            self._events[key].add(event)
        try:
            yield event
        finally:
            with self._lock:
                waiters = self._events.get(key)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._events[key]

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen, name="job-waiter", daemon=True)
                self._thread.start()

    def _wake(self, key: tuple[str, str] | None) -> None:
        with self._lock:
            groups = [self._events.get(key, ())] if key else list(self._events.values())
            for events in groups:
                for event in events:
                    event.set()

    def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                client = redis.Redis.from_url(self._redis_url, socket_connect_timeout=2)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(*_CHANNELS)
                pubsub.get_message(timeout=2)  # the subscribe confirmation
                self._subscribed.set()
                self._wake(None)  # a job may have finished while we were not subscribed
                backoff = 0.1
                for message in pubsub.listen():
                    if message and message["type"] == "message":
                        self._wake((message["channel"].decode(), message["data"].decode()))
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any Redis outage
                log.warning("job notification subscription lost (%s: %s); renewing", type(exc).__name__, exc)
            self._subscribed.clear()
            self._wake(None)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
