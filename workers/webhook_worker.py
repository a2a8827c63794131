"""Webhooks worker entry point: `python -m workers.webhook_worker`.

A Celery worker on the `webhooks` queue only (never on a GPU worker: a slow receiver must not hold an
engine's slot), with the threads pool since sending is network-bound, plus the dispatcher thread that
puts due deliveries on that queue (tasks.webhooks.dispatcher).
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_shutting_down

from tasks.celery_app import create_celery
from tasks.db import make_pool
from tasks.names import WEBHOOKS_QUEUE
from tasks.logs import configure as configure_logs
from tasks.settings import Settings
from tasks.webhooks.dispatcher import Dispatcher


def main() -> None:
    settings = Settings.from_env().require_urls()
    configure_logs(settings.log_format)
    app = create_celery(settings)
    app.db = make_pool(settings.database_url, max_size=settings.webhook_concurrency + 2, name="webhooks")
    stop = threading.Event()
    worker_shutting_down.connect(lambda **_: stop.set(), weak=False)
    Dispatcher(app, stop).start()
    try:
        app.Worker(
            hostname=f"webhooks@{settings.node_id}",
            queues=[WEBHOOKS_QUEUE],
            pool="threads",
            concurrency=settings.webhook_concurrency,
            loglevel="INFO",
        ).start()
    finally:
        stop.set()


if __name__ == "__main__":
    main()
