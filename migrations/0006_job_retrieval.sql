-- RAG jobs (issue 10, point 5): the retrieval phase on the GPU worker, right before generation, is
-- visible in the job's timestamps (both stay NULL for a job without `rag`).
-- depends: 0005_collection_metadata

ALTER TABLE jobs ADD COLUMN retrieval_started_at timestamptz, ADD COLUMN retrieved_at timestamptz;
