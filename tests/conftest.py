"""Shared fixtures: every test session starts its own Postgres (+pgvector) and Valkey on free ports, so
nothing depends on services already running on the machine or on state left by an earlier run."""

from __future__ import annotations

import os
import uuid

import pytest
import redis as redis_lib

from ops.services import EmbeddedPostgres, EmbeddedValkey, free_port
from tasks.jobs import tenants
from tasks.db import make_pool, migrate
from tasks.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture
def make_cluster(backing, model_path, tmp_path):
    """Factory for a `ops.testbed.Cluster` with its own database (on the session's Postgres) and its
    own Valkey server, so its reconciler sees only its own jobs and nodes."""
    from ops.testbed import Cluster, fresh_database

    made = []

    def make(*, own_postgres: bool = False, **settings):
        pg, _ = backing
        n = len(made)
        own_pg = EmbeddedPostgres(tmp_path / f"pg{n}", free_port()).start() if own_postgres else None
        valkey = EmbeddedValkey(tmp_path / f"valkey{n}", free_port()).start()
        (tmp_path / f"logs{n}").mkdir()
        cluster = Cluster(tmp_path / f"logs{n}", database_url=fresh_database((own_pg or pg).url),
                          redis_url=valkey.url, model_path=model_path, **settings)
        cluster.valkey, cluster.postgres = valkey, own_pg
        cluster.tenant = tenants.create_tenant(cluster.db, "cluster-tenant")[0]
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
        cluster.valkey.stop()
        if cluster.postgres:
            cluster.postgres.stop(mode="immediate")
