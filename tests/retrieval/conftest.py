"""Retrieval fixtures: the real embedding model (loaded once per session) and connections from the
session's real Postgres + pgvector."""

from __future__ import annotations

import uuid

import pytest

from retrieval import store
from retrieval.embedding import Embedder


@pytest.fixture(scope="session")
def embedder():
    model = Embedder()
    model.load()
    return model


@pytest.fixture
def conn(db):
    with db.connection() as connection:
        yield connection


@pytest.fixture
def collection(conn, tenant, embedder):
    """A fresh collection of the test's tenant, for the real embedding model."""
    return store.create_collection(conn, tenant[0].id, f"docs-{uuid.uuid4().hex[:8]}",
                                   embedding_model=embedder.model_name, embedding_dim=embedder.dimension)
