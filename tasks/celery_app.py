"""The Celery app factory. Creating the app opens nothing; connections are made on first use in the
process that uses them (after gunicorn's or Celery's fork)."""

from __future__ import annotations

import json
from functools import cached_property, partial

import redis
from celery import Celery
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

from tasks.names import route_queue
from tasks.settings import Settings


class SafeEventDispatcher(EventDispatcher):
    """Celery's event dispatcher without the lost task events of threads-pool workers.

    A worker on an event loop (Redis) buffers task events, which its pool threads add, and the loop
    publishes them together. Celery 5.6.3 loses some two ways, and Flower then showed tasks of the router
    and the webhooks worker unfinished (or only sent) forever:
    * flush() empties the buffer after publishing it, dropping what threads added meanwhile
      (celery/celery#10434; fixed in #10435, unreleased): here it publishes a copy and removes only that;
    * a pool thread asks for the flush by adding to the loop's ready set directly
      (Consumer.on_send_event_buffered), racing the loop as it takes that set, and the request is lost
      until the next event: here it goes through the loop's call_soon, thread-safe, which wakes it."""

    def __init__(self, *args, on_send_buffered=None, **kwargs):
        hub = getattr(getattr(on_send_buffered, "__self__", None), "hub", None)  # the consumer's loop
        if hub is not None:
            on_send_buffered = partial(hub.call_soon, self.flush)
        super().__init__(*args, on_send_buffered=on_send_buffered, **kwargs)

    def flush(self, errors=True, groups=True):
        super().flush(errors=errors, groups=False)
        if groups:
            with self.mutex:
                for group, events in self._group_buffer.items():
                    if events:
                        batch = list(events)
                        self._publish(batch, self.producer, f"{group}.multi")
                        del events[:len(batch)]


class SafeEvents(Events):
    dispatcher_cls = SafeEventDispatcher


class SwitchyardCelery(Celery):
    """A Celery app that carries the settings and the process's Redis and Postgres handles."""

    events_cls = SafeEvents
    settings: Settings
    #: set by the GPU worker at boot (workers.node.Node): callable(list[(job_id, attempt)]) -> None
    node = None

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, health_check_interval=30)

    @cached_property
    def backend(self):
        """Celery's result backend, built once per process. Celery builds it once per *thread*, which
        under gevent is once per greenlet, so once per API request: a scan of every installed package's
        entry points, measured at 57 % of an API worker's CPU under a stream of submits. Results live
        in Postgres (`task_ignore_result`), so this is Celery's stateless DisabledBackend."""
        return super().backend

    def send_task(self, name, *args, **options):
        """Celery's `send_task`, storing no result: `task_ignore_result` covers tasks called through their
        signature only, and every message here is sent by name."""
        options.setdefault("ignore_result", True)
        return super().send_task(name, *args, **options)

    @cached_property
    def db(self):
        """The Postgres pool (named `db`: Celery's own `app.pool` is the broker connection pool)."""
        from tasks.db import make_pool

        # A short wait for a connection: while Postgres is down, callers (the outage ride-out) retry
        # on their own schedule rather than sit 30 s in the pool. A batch thread holds a connection only
        # for its transitions, so past 32 threads they take turns (a GPU worker runs one per engine seat,
        # 256 by default, and Postgres allows 100 to 200 connections in all).
        return make_pool(self.settings.database_url, max_size=min(self.settings.batch_concurrency, 32) + 4,
                         timeout=5)

    def restore_unacked(self, queue: str) -> int:
        """Put back on `queue` every message Redis holds as delivered to it but not acknowledged.

        A consumer's unacked messages are only restored by Redis's transport after the visibility
        timeout (an hour, since jobs are acked late). Nodes and routers call this after they lose
        their broker connection: the messages their old connection had taken are delivered again at once.
        A copy of a message still in hand is harmless: jobs start only
        through a conditional update, so one copy runs and the other is skipped."""
        restored = 0
        with self.connection_for_write() as conn:
            channel = conn.default_channel
            for tag, raw in channel.client.hscan_iter(channel.unacked_key):
                _payload, _exchange, routing_key = json.loads(raw)
                if routing_key == queue:
                    channel.qos.restore_by_tag(tag, leftmost=True)
                    restored += 1
        return restored


def create_celery(settings: Settings) -> SwitchyardCelery:
    app = SwitchyardCelery("switchyard", broker=settings.redis_url, set_as_current=True)
    app.settings = settings
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in Postgres, not in a Celery result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=route_queue(settings.default_strategy),
        task_create_missing_queues=True,
        # One visibility timeout for everything: longer than the longest job (checked in Settings).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
        # Loaded by every worker at start: the task events of celery-batches tasks, which it sends none of.
        imports=("workers.batch",),
        worker_hijack_root_logger=False,
    )
    # Every worker process (router, GPU, webhooks, ingest) serves its metrics on a port of its own from
    # the moment it starts (tasks.metrics explains why per process); connected once per process.
    from celery.signals import worker_init

    from tasks.metrics.exposition import on_worker_init

    worker_init.connect(on_worker_init, weak=False, dispatch_uid="switchyard-metrics")
    # Every task, registered with this app (the task modules import nothing from here).
    import tasks.ingest.task  # noqa: F401
    import tasks.jobs.task  # noqa: F401
    import tasks.routing.task  # noqa: F401
    import tasks.webhooks.task  # noqa: F401

    return app
