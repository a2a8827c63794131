"""Ingest fixtures: a real ingest worker process (`python -m workers.ingest_worker`) on the session's
Postgres and its own Valkey database, and the API in-process publishing to that same database."""

from __future__ import annotations

import os
import sys

import pytest

from api import create_app
from ops.processes import ProcessGroup
from tasks.celery_app import create_celery


@pytest.fixture(scope="module")
def ingest_settings(base_settings):
    redis_base = base_settings.redis_url.rsplit("/", 1)[0]
    return base_settings.model_copy(update={"redis_url": f"{redis_base}/4", "node_id": "test-ingest",
                                            # a document's ingestion is presumed dead after 3 s without progress
                                            "ingest_stall_after": 3.0})


@pytest.fixture
def ingest_worker(ingest_settings, tmp_path):
    """One ingest worker, its model loaded and answering a ping; stopped (again) at the end."""
    env = {**os.environ, "DATABASE_URL": ingest_settings.database_url, "REDIS_URL": ingest_settings.redis_url,
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SWITCHYARD_NODE_ID": "test-ingest",
           "SWITCHYARD_INGEST_CONCURRENCY": "2", "SWITCHYARD_INGEST_STALL_AFTER": str(ingest_settings.ingest_stall_after),
           # small batches: progress shows often enough for a test to stop the worker half way
           "SWITCHYARD_EMBEDDING_BATCH_SIZE": "8"}
    workers = ProcessGroup(tmp_path / "logs", env)
    try:
        workers.start("ingest", [sys.executable, "-m", "workers.ingest_worker"])
        celery = create_celery(ingest_settings)
        workers.wait_until(lambda: any("ingest@test-ingest" in reply for reply in celery.control.ping(timeout=0.5)),
                           90, "the ingest worker answering a ping")
        yield workers
    finally:
        workers.stop()


@pytest.fixture(scope="module")
def app(ingest_settings):
    return create_app(ingest_settings)


@pytest.fixture
def client(app):
    return app.test_client()
