"""The whole-process tier: fixtures that start the system as separate processes."""

from __future__ import annotations

import pytest

from ops.services import EmbeddedPostgres, EmbeddedValkey, free_port
from tasks.jobs import tenants


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
