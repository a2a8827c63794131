"""An app (settings, pool, Redis) of each test module's own: a fresh database, and a Redis database that
no router or worker consumes, emptied before each test."""

from __future__ import annotations

import pytest

from ops.testbed import fresh_database
from tasks.celery_app import create_celery
from tasks.db import make_pool
from tasks.jobs import tenants


@pytest.fixture(scope="module")
def app(backing, base_settings):
    pg, valkey = backing
    settings = base_settings.model_copy(update={
        "database_url": fresh_database(pg.url), "redis_url": valkey.url.rsplit("/", 1)[0] + "/5",
        "node_id": "jobs-tests", "redispatch_after": 1.0, "ingest_stall_after": 2.0})
    app = create_celery(settings)
    app.db = make_pool(settings.database_url, max_size=4, name="jobs-tests")
    yield app
    app.db.close()


@pytest.fixture(scope="module")
def app_tenant(app):
    return tenants.create_tenant(app.db, "jobs-tests")[0]
