"""The whole system as separate processes: gunicorn API, router, one GPU worker running the real vLLM
engine, and Flower, over this session's own Postgres and Valkey."""

from __future__ import annotations

import os

import pytest
import requests

from ops.services import EmbeddedValkey, free_port
from ops.testbed import fresh_database
from tasks.db import make_pool
from tasks.jobs import tenants
from tests.system.engine.support import NODE_ID, Stack
from tests.support import auth


@pytest.fixture(scope="package")
def stack(backing, base_settings, tmp_path_factory):
    """Package-scoped, with its own database and Valkey: its router's reconciler must not take other
    tests' jobs (routed to made-up nodes) for orphans, and it is gone before the next package runs."""
    pg, _ = backing
    root = tmp_path_factory.mktemp("stack")
    valkey = EmbeddedValkey(root / "valkey", free_port()).start()
    env = {**os.environ, "DATABASE_URL": fresh_database(pg.url), "REDIS_URL": valkey.url,
           "SWITCHYARD_MODEL_PATH": str(base_settings.resolved_model_path), "SWITCHYARD_NODE_ID": NODE_ID,
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "FLOWER_UNAUTHENTICATED_API": "1"}
    s = Stack(root / "logs", env)
    try:
        s.start_all()
        s.wait_ready()
        yield s
    finally:
        try:
            s.stop()
        finally:
            valkey.stop()


@pytest.fixture(scope="package")
def api_key(stack):
    with make_pool(stack.env["DATABASE_URL"], max_size=1, name="integration") as pool:
        return tenants.create_tenant(pool, "integration")[1]


@pytest.fixture(scope="package")
def http(api_key):
    session = requests.Session()
    session.headers.update(auth(api_key))
    return session
