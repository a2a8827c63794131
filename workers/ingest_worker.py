"""Ingest worker entry point: `python -m workers.ingest_worker`.

A Celery worker on the `ingest` queue only (parsing and embedding are CPU work that must never take a
GPU worker's slot), with the threads pool and a small concurrency: the threads share the one embedding
model, loaded here at boot in the main process (never at import, and never before a fork: torch state
does not survive fork), so the first document does not pay for it.
"""

from __future__ import annotations

import logging

from tasks.celery_app import create_celery
from tasks.db import make_pool
from tasks.ingest.task import settings_embedder
from tasks.names import INGEST_QUEUE
from tasks.logs import configure as configure_logs
from tasks.settings import Settings

log = logging.getLogger("workers.ingest_worker")


def main() -> None:
    settings = Settings.from_env().require_urls()
    configure_logs(settings.log_format)
    app = create_celery(settings)
    app.db = make_pool(settings.database_url, max_size=settings.ingest_concurrency + 2, name="ingest")
    embedder = settings_embedder(settings)
    embedder.load()
    log.info("embedding model %s loaded (%d dimensions)", embedder.model_name, embedder.dimension)
    app.Worker(
        hostname=f"ingest@{settings.node_id}",
        queues=[INGEST_QUEUE],
        pool="threads",
        concurrency=settings.ingest_concurrency,
        prefetch_multiplier=1,  # a long document must not hold others back on this worker
        loglevel="INFO",
    ).start()


if __name__ == "__main__":
    main()
