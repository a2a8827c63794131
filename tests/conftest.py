"""Shared fixtures: every test session starts its own Postgres (+pgvector) and Valkey on free ports, so
nothing depends on services already running on the machine or on state left by an earlier run.

Tests under tests/system/ run the system as separate processes (API servers, routers, GPU and webhook
workers): they are marked `system` (`pytest -m "not system"` runs the rest, in about a minute)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis as redis_lib

from ops.services import EmbeddedPostgres, EmbeddedValkey, free_port
from tests.receiver import Receiver
from tasks.jobs import tenants
from tasks.db import make_pool, migrate
from tasks.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Worker processes (and Celery workers built in-process) serve no metrics port unless a test gives one:
# the fixed default ports would be taken by whichever test came first.
os.environ.setdefault("SWITCHYARD_METRICS_PORT", "0")


@pytest.fixture(scope="session")
def backing(tmp_path_factory):
    """(database_url, redis_url) of this session's own embedded Postgres and Valkey."""
    root = tmp_path_factory.mktemp("services")
    pg = EmbeddedPostgres(root / "pg", free_port()).start()
    valkey = EmbeddedValkey(root / "valkey", free_port()).start()
    migrate(pg.url, log=lambda _m: None)
    yield pg, valkey
    valkey.stop()
    pg.stop(mode="immediate")


@pytest.fixture(scope="session")
def model_path():
    from workers.model import prepare

    return prepare(Settings.from_env().cache_dir, log=lambda _m: None)


@pytest.fixture(scope="session")
def base_settings(backing, model_path) -> Settings:
    pg, valkey = backing
    return Settings(database_url=pg.url, redis_url=valkey.url, model_path=model_path, node_id="test-gpu-0")


@pytest.fixture(scope="session")
def db(base_settings):
    with make_pool(base_settings.database_url, max_size=4, name="tests") as pool:
        yield pool


@pytest.fixture
def redis(base_settings):
    client = redis_lib.Redis.from_url(base_settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def tenant(db):
    """A fresh tenant and its API key."""
    return tenants.create_tenant(db, f"tenant-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def canary():
    """An internal service on every local address, on a port no allow-list entry names."""
    r = Receiver(host="0.0.0.0").start()
    yield r
    r.stop()


def pytest_collection_modifyitems(config, items):
    system = Path(__file__).parent / "system"
    for item in items:
        if system in Path(item.fspath).parents:
            item.add_marker(pytest.mark.system)
