-- Cancel-After (a client's deadline on POST /v1/jobs): a job not finished by cancel_at is cancelled by
-- the reconciler, which finds such jobs through the partial index.
-- depends: 0007_document_progress

ALTER TABLE jobs ADD COLUMN cancel_at timestamptz;
CREATE INDEX jobs_cancel_at ON jobs (cancel_at) WHERE cancel_at IS NOT NULL AND status IN ('queued', 'routed', 'running');
