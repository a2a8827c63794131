-- Collections carry the client's own metadata (POST /v1/collections {"name", "metadata"}).
-- depends: 0004_retrieval

ALTER TABLE collections ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'::jsonb;
