"""Router entry point: `python -m workers.router` consumes the `route.*` queues and runs the reconciler."""

from __future__ import annotations


from tasks.celery_app import create_celery
from tasks.jobs.reconciler import reconcile_forever
from tasks.names import route_queue
from tasks.routing.strategies import NAMES as STRATEGIES
from tasks.logs import configure as configure_logs
from tasks.settings import Settings


def main() -> None:
    settings = Settings.from_env().require_urls()
    configure_logs(settings.log_format)
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
