"""Router entry point: `python -m workers.router` consumes the `route.*` queues and runs the reconciler."""

from __future__ import annotations

import logging

from tasks.celery_app import create_celery
from tasks.jobs.reconciler import reconcile_forever
from tasks.names import route_queue
from tasks.routing.strategies import NAMES as STRATEGIES
from tasks.settings import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env().require_urls()
    app = create_celery(settings)
    stop = reconcile_forever(app)
    try:
        app.Worker(
            hostname=f"router@{settings.node_id}",
            queues=[route_queue(s) for s in STRATEGIES],
            pool="threads",
            concurrency=8,
            loglevel="INFO",
        ).start()
    finally:
        stop.set()


if __name__ == "__main__":
    main()
