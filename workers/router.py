"""Router entry point: `python -m workers.router` consumes the `route.*` queues and runs the reconciler
and the dispatcher (one of each is active cluster-wide at a time, whatever the number of routers)."""

from __future__ import annotations


from tasks.celery_app import create_celery
from tasks.jobs.reconciler import reconcile_forever
from tasks.routing.dispatcher import dispatch_forever
from tasks.routing.task import ROUTE_BATCH
from tasks.names import route_queue
from tasks.routing.strategies import NAMES as STRATEGIES
from tasks.logs import configure as configure_logs
from tasks.settings import Settings


def main() -> None:
    settings = Settings.from_env().require_urls()
    configure_logs(settings.log_format)
    app = create_celery(settings)
    stops = [reconcile_forever(app), dispatch_forever(app)]
    try:
        app.Worker(
            hostname=f"router@{settings.node_id}",
            queues=[route_queue(s) for s in STRATEGIES],
            pool="threads",
            concurrency=4,
            # Acks are late: the prefetch must hold a whole route batch, and the next one filling.
            prefetch_multiplier=ROUTE_BATCH // 2,
            loglevel="INFO",
        ).start()
    finally:
        for stop in stops:
            stop.set()


if __name__ == "__main__":
    main()
