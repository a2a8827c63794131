"""Webhook fixtures: allow-listed settings for the receiver on loopback (tests/conftest.py starts it and
the canary that must never be reached), two real webhooks worker processes (`python -m workers.webhook_worker`, each with its
dispatcher) on the session's Postgres and Valkey, and the API in-process."""

from __future__ import annotations

import sys

import pytest

from api import create_app
from ops.processes import ProcessGroup
from ops.services import free_port
from tasks.celery_app import create_celery
from tests.system.webhooks.support import JITTER, SCHEDULE, WORKERS, worker_env


@pytest.fixture(scope="session")
def spare_port() -> int:
    """An allow-listed port with nothing listening until a test starts a receiver there."""
    return free_port()


@pytest.fixture(scope="session")
def webhook_settings(base_settings, receiver, spare_port):
    redis_base = base_settings.redis_url.rsplit("/", 1)[0]
    return base_settings.model_copy(update={
        "redis_url": f"{redis_base}/2",
        "webhook_allow": (f"127.0.0.1:{receiver.port}", f"127.0.0.1:{spare_port}"),
        "webhook_retry_schedule": SCHEDULE,
        "webhook_retry_jitter": JITTER,
        "webhook_sweep_interval": 0.2,
        "webhook_secret_overlap": 3600,
    })


@pytest.fixture(scope="session")
def webhook_workers(webhook_settings, tmp_path_factory):
    """Two webhooks workers (two dispatchers competing for the same rows), ready to consume."""
    workers = ProcessGroup(tmp_path_factory.mktemp("webhook-workers"), worker_env(webhook_settings))
    try:
        for i in range(WORKERS):
            workers.start(f"worker-{i}", [sys.executable, "-m", "workers.webhook_worker"],
                          SWITCHYARD_NODE_ID=f"test-{i}")
        app = create_celery(webhook_settings)
        expected = {f"webhooks@test-{i}" for i in range(WORKERS)}
        workers.wait_until(lambda: expected <= {name for reply in app.control.ping(timeout=0.5) for name in reply},
                           60, f"webhooks workers {sorted(expected)} answering a ping")
        yield workers
    finally:
        workers.stop()


@pytest.fixture(scope="session")
def app(webhook_settings):
    # Its own Redis database: nothing consumes the route queues the API publishes to here.
    redis_base = webhook_settings.redis_url.rsplit("/", 1)[0]
    return create_app(webhook_settings.model_copy(update={"redis_url": f"{redis_base}/3"}))


@pytest.fixture
def client(app):
    return app.test_client()
