"""The services' least-privileged Postgres role (`python -m ops.admin app-role`): as that role the
service's own work goes through (tenants, jobs, a collection and its HNSW index, documents), and the
schema cannot be changed or dropped."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg
import pytest

from ops.testbed import fresh_database
from retrieval import store as retrieval
from tasks.db import make_pool
from tasks.jobs import store, tenants


def test_the_app_role_does_the_services_work_and_no_ddl(backing):
    pg, _ = backing
    url = fresh_database(pg.url)
    role = f"app_{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-m", "ops.admin", "app-role", role],
                          env={**os.environ, "DATABASE_URL": url, "SWITCHYARD_APP_DB_PASSWORD": "s3cret"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert url.startswith("postgresql://postgres@")
    app_url = url.replace("postgresql://postgres@", f"postgresql://{role}:s3cret@", 1)
    with make_pool(app_url, max_size=2, name="as-app-role") as pool:
        tenant, _ = tenants.create_tenant(pool, "least-privilege")
        row, created = store.insert_job(pool, tenant_id=tenant.id, model="m", strategy="round_robin",
                                        request={"prompt": "x"}, metadata={}, max_attempts=1)
        assert created and store.cancel_job(pool, row["id"], tenant.id, {"type": "cancelled", "message": "x"})
        with pool.connection() as conn:
            collection = retrieval.create_collection(conn, tenant.id, "docs", embedding_model="m", embedding_dim=4)
            retrieval.add_document(conn, tenant.id, collection.id, b"text", title="t", content_type="text/plain")
            retrieval.delete_collection(conn, tenant.id, collection.id)
            for ddl in ("DROP TABLE jobs", "ALTER TABLE tenants ADD COLUMN x int", "TRUNCATE api_keys"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(ddl)

