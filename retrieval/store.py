"""Collections, documents and chunks in Postgres (pgvector); the SQL is all here, in the open.

Every statement names the tenant, so a tenant id that does not own a row behaves as if it did not
exist. Functions take a psycopg connection (autocommit, as the pool hands them out) and open their own
transaction where several statements must hold together.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from retrieval.errors import CollectionExists, IngestionSuperseded, NotFound


@dataclass(frozen=True)
class Collection:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    embedding_model: str
    embedding_dim: int
    hnsw_m: int
    hnsw_ef_construction: int
    metadata: dict = field(default_factory=dict)  # the client's own, returned as given


_COLLECTION_COLUMNS = "id, tenant_id, name, embedding_model, embedding_dim, hnsw_m, hnsw_ef_construction, metadata"
DOCUMENT_COLUMNS = ("id, collection_id, tenant_id, title, source_filename, content_type, metadata, status, "
                    "error, chunks_embedded, chunks_total, created_at, updated_at")


def vector_literal(vector) -> str:
    """pgvector's text form; sent as text and cast in SQL, so no per-connection type setup is needed."""
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


def hnsw_index_name(collection_id: uuid.UUID) -> str:
    return f"chunks_hnsw_{collection_id.hex}"


def create_collection(conn: psycopg.Connection, tenant_id, name: str, *, embedding_model: str,
                      embedding_dim: int, hnsw_m: int = 16, hnsw_ef_construction: int = 64,
                      metadata: dict | None = None) -> Collection:
    """A new collection and its own HNSW index (see migrations/0004_retrieval.sql for why per collection).

    The index is built CONCURRENTLY: a partial index still scans the whole chunks table, and a plain
    CREATE INDEX would block every other collection's ingestion meanwhile. That needs an autocommit
    connection (as the pool hands them out); the row is removed again if the index cannot be built."""
    collection_id = uuid.uuid4()
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                f"""INSERT INTO collections (id, tenant_id, name, embedding_model, embedding_dim, hnsw_m,
                                             hnsw_ef_construction, metadata)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLLECTION_COLUMNS}""",
                (collection_id, tenant_id, name, embedding_model, embedding_dim, hnsw_m, hnsw_ef_construction,
                 json.dumps(metadata or {})),
            ).fetchone()
    except psycopg.errors.UniqueViolation as e:
        raise CollectionExists(f"a collection named {name!r} already exists") from e
    index = sql.SQL(
        "CREATE INDEX CONCURRENTLY {name} ON chunks USING hnsw ((embedding::vector({dim})) vector_cosine_ops) "
        "WITH (m = {m}, ef_construction = {ef}) WHERE collection_id = {id}"
    ).format(name=sql.Identifier(hnsw_index_name(collection_id)), dim=sql.Literal(int(embedding_dim)),
             m=sql.Literal(int(hnsw_m)), ef=sql.Literal(int(hnsw_ef_construction)),
             id=sql.Literal(str(collection_id)))
    try:
        conn.execute(index)
    except BaseException:
        _drop(conn, collection_id)  # a failed concurrent build leaves an invalid index behind
        raise
    return Collection(**row)


def _drop(conn: psycopg.Connection, collection_id: uuid.UUID) -> None:
    """The collection's row (its documents and chunks by cascade), then its index, without locking
    the chunks table against other collections' searches (DROP INDEX CONCURRENTLY)."""
    conn.execute("DELETE FROM collections WHERE id = %s", (collection_id,))
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
        sql.Identifier(hnsw_index_name(collection_id))))


def get_collections(conn: psycopg.Connection, tenant_id, collection_ids) -> list[Collection]:
    """The tenant's collections with these ids, in the order asked; any missing one is NotFound."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE tenant_id = %s AND id = ANY(%s)",
            (tenant_id, [uuid.UUID(str(c)) for c in collection_ids]),
        ).fetchall()
    found = {r["id"]: Collection(**r) for r in rows}
    missing = [str(c) for c in collection_ids if uuid.UUID(str(c)) not in found]
    if missing:
        raise NotFound(f"no collection {', '.join(missing)}")
    return [found[uuid.UUID(str(c))] for c in collection_ids]


def list_collections(conn: psycopg.Connection, tenant_id) -> list[Collection]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE tenant_id = %s ORDER BY name",
                           (tenant_id,)).fetchall()
    return [Collection(**r) for r in rows]


def delete_collection(conn: psycopg.Connection, tenant_id, collection_id) -> None:
    """The collection, its documents, chunks and index; NotFound if the tenant has no such collection.
    Needs an autocommit connection (the index is dropped CONCURRENTLY)."""
    (collection,) = get_collections(conn, tenant_id, [collection_id])
    _drop(conn, collection.id)


def add_document(conn: psycopg.Connection, tenant_id, collection_id, content: bytes, *, title: str,
                 content_type: str, source_filename: str | None = None,
                 metadata: dict | None = None) -> tuple[dict, bool]:
    """(document, created): content already in the collection (same SHA-256) is stored once, and the
    existing document is returned with created=False."""
    get_collections(conn, tenant_id, [collection_id])
    digest = hashlib.sha256(content).digest()
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"""INSERT INTO documents (collection_id, tenant_id, title, source_filename, content_type, content,
                                       content_sha256, metadata)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (collection_id, content_sha256) DO NOTHING RETURNING {DOCUMENT_COLUMNS}""",
            (collection_id, tenant_id, title, source_filename, content_type, content, digest,
             json.dumps(metadata or {})),
        ).fetchone()
        if row:
            return row, True
        return cur.execute(
            f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE collection_id = %s AND content_sha256 = %s",
            (collection_id, digest),
        ).fetchone(), False


def get_document(conn: psycopg.Connection, tenant_id, document_id) -> dict:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE id = %s AND tenant_id = %s",
                          (document_id, tenant_id)).fetchone()
    if row is None:
        raise NotFound(f"no document {document_id}")
    return row


def list_documents(conn: psycopg.Connection, tenant_id, collection_id) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"""SELECT {DOCUMENT_COLUMNS} FROM documents WHERE tenant_id = %s AND collection_id = %s
                ORDER BY created_at DESC, id""", (tenant_id, collection_id)).fetchall()


def delete_document(conn: psycopg.Connection, tenant_id, document_id) -> None:
    """The document and (by cascade) its chunks."""
    if not conn.execute("DELETE FROM documents WHERE id = %s AND tenant_id = %s",
                        (document_id, tenant_id)).rowcount:
        raise NotFound(f"no document {document_id}")


def claim_document(conn: psycopg.Connection, tenant_id, document_id, *,
                   stalled_after: float | None = None) -> dict | None:
    """Start an ingestion run: the document becomes `processing` under a new attempt number and any
    chunks an earlier, interrupted run left are deleted, in one transaction. None if it is `ready`.

    With `stalled_after`, a document another run is `processing` is only taken over once that run has
    made no progress (no batch stored) for that many seconds: a duplicate message does not restart a
    healthy run. Without it (a retry of this very message, whose run has ended), any run is taken over."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """UPDATE documents SET status = 'processing', attempt = attempt + 1, error = NULL,
                                    chunks_embedded = 0, chunks_total = NULL, updated_at = now()
                WHERE id = %s AND tenant_id = %s AND status <> 'ready'
                  AND (status <> 'processing' OR %s::float8 IS NULL
                       OR updated_at < now() - make_interval(secs => %s::float8))
            RETURNING id, tenant_id, collection_id, attempt, content, content_type, metadata""",
            (document_id, tenant_id, stalled_after, stalled_after),
        ).fetchone()
        if row:
            cur.execute("DELETE FROM chunks WHERE document_id = %s", (document_id,))
    if row is None:
        get_document(conn, tenant_id, document_id)  # NotFound if it is not the tenant's
    return row


def stalled_documents(conn: psycopg.Connection, older_than: float, limit: int = 500) -> list[dict]:
    """Documents, of every tenant, `queued` or `processing` with no progress for `older_than` seconds:
    their ingest message was lost, or the worker running them died (updated_at moves with every batch)."""
    with conn.cursor(row_factory=dict_row) as cur:
        # Each status on its own: a long backlog of queued documents must not hide a dead run's document.
        return [row for status in ("processing", "queued") for row in cur.execute(
            """SELECT id, tenant_id, status, attempt FROM documents
                WHERE status = %s AND updated_at < now() - make_interval(secs => %s)
                ORDER BY updated_at LIMIT %s""", (status, older_than, limit)).fetchall()]


def _fence(cur, document_id, attempt: int) -> None:
    """Hold the document row (shared) for this transaction, provided this run still owns it; a newer
    claim's UPDATE waits for us, and we see its attempt number if it came first."""
    if not cur.execute("SELECT 1 FROM documents WHERE id = %s AND attempt = %s AND status = 'processing' "
                       "FOR SHARE", (document_id, attempt)).fetchone():
        raise IngestionSuperseded(f"document {document_id}: attempt {attempt} was superseded")


def set_chunks_total(conn: psycopg.Connection, document_id, attempt: int, total: int) -> None:
    with conn.transaction(), conn.cursor() as cur:
        _fence(cur, document_id, attempt)
        cur.execute("UPDATE documents SET chunks_total = %s, updated_at = now() WHERE id = %s",
                    (total, document_id))


def insert_chunks(conn: psycopg.Connection, document: dict, attempt: int, chunks, vectors,
                  metadata: dict) -> None:
    """One batch of chunks with their vectors, and the progress counter, in one transaction."""
    rows = [(document["id"], document["collection_id"], document["tenant_id"], c.ordinal, c.text,
             c.char_start, c.char_end, c.page, list(c.heading_path),
             json.dumps({**metadata, **({"page": c.page} if c.page else {})}), vector_literal(v))
            for c, v in zip(chunks, vectors, strict=True)]
    with conn.transaction(), conn.cursor() as cur:
        _fence(cur, document["id"], attempt)
        cur.executemany(
            """INSERT INTO chunks (document_id, collection_id, tenant_id, ordinal, text, char_start, char_end,
                                   page, heading_path, metadata, embedding)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::vector)""", rows)
        cur.execute("UPDATE documents SET chunks_embedded = chunks_embedded + %s, updated_at = now() "
                    "WHERE id = %s", (len(rows), document["id"]))


def mark_ready(conn: psycopg.Connection, document_id, attempt: int) -> bool:
    """`ready`, only if this run still owns the document and every chunk it counted is stored."""
    return bool(conn.execute(
        """UPDATE documents SET status = 'ready', updated_at = now()
            WHERE id = %s AND attempt = %s AND status = 'processing'
              AND chunks_total = (SELECT count(*) FROM chunks WHERE document_id = %s)""",
        (document_id, attempt, document_id)).rowcount)


def mark_failed(conn: psycopg.Connection, document_id, attempt: int, error: str) -> None:
    """`failed` with its reason, and no chunks left behind (one transaction)."""
    with conn.transaction():
        if conn.execute("""UPDATE documents SET status = 'failed', error = %s, chunks_embedded = 0,
                                                updated_at = now()
                            WHERE id = %s AND attempt = %s AND status = 'processing'""",
                        (error, document_id, attempt)).rowcount:
            conn.execute("DELETE FROM chunks WHERE document_id = %s", (document_id,))
