-- Ingestion recovery (issue 10, point 7): the reconciler looks for documents whose ingestion stopped
-- making progress (updated_at moves with every stored batch), so those rows need an index of their own.
-- depends: 0006_job_retrieval

CREATE INDEX documents_in_progress ON documents (updated_at) WHERE status IN ('queued', 'processing');
