-- Retrieval (issue 10): per-tenant collections, documents and their embedded chunks.
-- depends: 0003_webhooks

-- A collection records the embedding model and dimension its vectors were made with: a search is
-- refused unless the query is embedded by the same model (vectors of two models are not comparable,
-- even at the same dimension). `hnsw_m` / `hnsw_ef_construction` are the parameters of its own index.
CREATE TABLE collections (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id            uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                 text NOT NULL,
    embedding_model      text NOT NULL,
    embedding_dim        integer NOT NULL CHECK (embedding_dim BETWEEN 1 AND 2000),  -- HNSW's limit for vector
    hnsw_m               integer NOT NULL DEFAULT 16 CHECK (hnsw_m BETWEEN 2 AND 100),
    hnsw_ef_construction integer NOT NULL DEFAULT 64 CHECK (hnsw_ef_construction BETWEEN 4 AND 1000),
    created_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- The original bytes are kept so that an ingestion retried after a crash can start again from them.
-- The same content in one collection is stored once: (collection_id, content_sha256) is unique.
-- `attempt` fences ingestion runs: a run that was superseded by a newer one writes nothing more.
CREATE TABLE documents (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    collection_id   uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    title           text NOT NULL,
    source_filename text,
    content_type    text NOT NULL,
    content         bytea NOT NULL,
    content_sha256  bytea NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    status          text NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('queued', 'processing', 'ready', 'failed')),
    error           text,
    attempt         integer NOT NULL DEFAULT 0,
    chunks_embedded integer NOT NULL DEFAULT 0,
    chunks_total    integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (collection_id, content_sha256)
);
CREATE INDEX documents_listing ON documents (tenant_id, collection_id, created_at DESC);

-- `text` is exactly the document's extracted text between char_start and char_end. `metadata` is the
-- document's metadata (copied at ingestion, documents are immutable) plus the chunk's own keys, so a
-- filter is one containment test on one row. `embedding` has no fixed dimension (collections may use
-- models of different sizes); see the index note below.
CREATE TABLE chunks (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id   uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    collection_id uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    ordinal       integer NOT NULL,
    text          text NOT NULL,
    char_start    integer NOT NULL,
    char_end      integer NOT NULL,
    page          integer,
    heading_path  text[] NOT NULL DEFAULT '{}',
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    embedding     vector NOT NULL,
    tsv           tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (document_id, ordinal)
);
CREATE INDEX chunks_tsv ON chunks USING gin (tsv);
CREATE INDEX chunks_metadata ON chunks USING gin (metadata jsonb_path_ops);
CREATE INDEX chunks_scope ON chunks (tenant_id, collection_id);

-- The HNSW index. HNSW needs a fixed dimension, and the column has none, so each collection gets its
-- own partial expression index, created with the collection (retrieval/store.py):
--     CREATE INDEX chunks_hnsw_<collection> ON chunks
--         USING hnsw ((embedding::vector(<dim>)) vector_cosine_ops) WITH (m = <m>, ef_construction = <ef>)
--         WHERE collection_id = '<collection>'
-- This is pgvector's documented way to index vectors of several dimensions in one column (an
-- expression index on `embedding::vector(n)` with a WHERE), with the collection as the WHERE:
--  - each collection keeps its own dimension and its own m / ef_construction;
--  - a collection's graph holds only its own rows, so the tenant/collection scope is not a filter the
--    HNSW scan has to dig through (with one shared graph, a small collection among large ones would
--    need iterative scans just to find its own rows); metadata filters are the only post-filter left;
--  - queries name the collection as a literal and order by the same expression, so the planner matches it.
-- The price: one index per collection (planning and each insert test every partial index's predicate),
-- fine for hundreds of collections; beyond that, move to one typed column + index per dimension.
-- Creating a collection scans the chunks table to build its (empty) index; it is built and dropped
-- CONCURRENTLY so that this never blocks other collections' ingestion or search.
