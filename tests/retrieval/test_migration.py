"""Migration 0004 applies and rolls back cleanly, per-collection HNSW indexes included (on a database
of its own, so the session's shared schema is untouched)."""

from __future__ import annotations

import uuid

import psycopg

from retrieval import store
from tasks.db import _yoyo_url, migrate


def test_0004_rolls_back_and_reapplies(backing, conn):
    name = f"rollback_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE DATABASE {name}")
    url = backing[0].url.rsplit("/", 1)[0] + "/" + name
    try:
        migrate(url, log=lambda _m: None)
        with psycopg.connect(url, autocommit=True) as c:
            tenant = uuid.uuid4()
            c.execute("INSERT INTO tenants (id, name) VALUES (%s, 't')", (tenant,))
            made = store.create_collection(c, tenant, "docs", embedding_model="m", embedding_dim=3)
            assert _indexes(c) == {store.hnsw_index_name(made.id)}
        _rollback(url, "0004_retrieval")
        with psycopg.connect(url, autocommit=True) as c:
            assert c.execute("SELECT to_regclass('chunks'), to_regclass('collections')").fetchone() == (None, None)
            assert _indexes(c) == set()
        assert migrate(url, log=lambda _m: None) == ["0004_retrieval"]
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _indexes(c) -> set[str]:
    return {r[0] for r in c.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'chunks_hnsw_%'")}


def _rollback(url: str, migration_id: str) -> None:
    from yoyo import get_backend, read_migrations

    from tasks.db import MIGRATIONS_DIR

    backend = get_backend(_yoyo_url(url))
    with backend.lock():
        backend.rollback_migrations(read_migrations(str(MIGRATIONS_DIR)).filter(lambda m: m.id == migration_id))
