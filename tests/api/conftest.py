"""The API in-process (Flask test client) over real Postgres and Redis, with no router consuming its
queues: whatever a request enqueues stays visible in Redis for the test to count."""

from __future__ import annotations

import pytest

from api import create_app


@pytest.fixture(scope="session")
def api_settings(base_settings):
    # Its own Redis database: no router or worker consumes these queues, so messages stay countable.
    return base_settings.model_copy(update={"redis_url": base_settings.redis_url.rsplit("/", 1)[0] + "/1"})


@pytest.fixture(scope="session")
def app(api_settings):
    return create_app(api_settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def api_redis(api_settings):
    import redis

    client = redis.Redis.from_url(api_settings.redis_url)
    client.flushdb()
    yield client
    client.close()
