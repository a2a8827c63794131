-- The per-collection HNSW indexes go with the table.
DROP TABLE chunks;
DROP TABLE documents;
DROP TABLE collections;
