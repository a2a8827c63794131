-- The Batch API (issue 14): uploaded files (a batch's JSONL input, its output and error files), batches,
-- the jobs a batch's lines run as, and batch status webhooks.
-- depends: 0013_job_priority

-- Files are kept whole in Postgres (a batch input is at most SWITCHYARD_BATCH_MAX_FILE_BYTES), per tenant.
-- `purpose`: `batch` (an input uploaded with POST /v1/files) or `batch_output` (an output or error file
-- a batch wrote when it ended).
CREATE TABLE files (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    purpose     text NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    text NOT NULL,
    bytes       bigint NOT NULL,
    lines       integer NOT NULL,
    content     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_tenant_listing ON files (tenant_id, created_at DESC, id DESC);

-- A batch, in OpenAI's states. Its lines are jobs (jobs.batch_id); while it is open its request counts
-- are read from them, and when it ends they are written here with its output and error files.
CREATE TABLE batches (
    id                 uuid PRIMARY KEY,
    tenant_id          uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    status             text NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress', 'finalizing',
                                                       'completed', 'expired', 'cancelling', 'cancelled')),
    endpoint           text NOT NULL,
    input_file_id      uuid NOT NULL REFERENCES files (id),
    completion_window  text NOT NULL,
    metadata           jsonb,
    webhook_url        text,                  -- from metadata.webhook_url: where batch.* events go
    errors             jsonb,                 -- [{code, line, message, param}] of a batch that failed validation
    output_file_id     uuid REFERENCES files (id),
    error_file_id      uuid REFERENCES files (id),
    request_total      integer NOT NULL DEFAULT 0,
    request_completed  integer NOT NULL DEFAULT 0,
    request_failed     integer NOT NULL DEFAULT 0,
    usage              jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    in_progress_at     timestamptz,
    expires_at         timestamptz NOT NULL,
    finalizing_at      timestamptz,
    completed_at       timestamptz,
    failed_at          timestamptz,
    expired_at         timestamptz,
    cancelling_at      timestamptz,
    cancelled_at       timestamptz
);
CREATE INDEX batches_tenant_listing ON batches (tenant_id, created_at DESC, id DESC);
-- What the reconciler looks at each sweep (tasks/batches/progress.py).
CREATE INDEX batches_open ON batches (expires_at) WHERE status IN ('in_progress', 'cancelling');

-- A batch line is a job of priority `batch`, with the batch's id, its line number and its custom_id.
ALTER TABLE jobs ADD COLUMN batch_id uuid REFERENCES batches (id) ON DELETE CASCADE,
                 ADD COLUMN batch_line integer,
                 ADD COLUMN custom_id text;
CREATE UNIQUE INDEX jobs_batch_custom_id ON jobs (batch_id, custom_id) WHERE batch_id IS NOT NULL;
CREATE INDEX jobs_batch_active ON jobs (batch_id)
    WHERE batch_id IS NOT NULL AND status IN ('queued', 'routed', 'running');

-- Batch events go through the same deliveries as job events: a delivery is about a job or a batch, and
-- holds the snapshot of the one it is about.
ALTER TABLE webhook_deliveries ALTER COLUMN job_id DROP NOT NULL,
                               ALTER COLUMN job DROP NOT NULL,
                               ADD COLUMN batch_id uuid REFERENCES batches (id) ON DELETE CASCADE,
                               ADD COLUMN batch jsonb,
                               ADD CONSTRAINT webhook_deliveries_subject CHECK ((job_id IS NULL) <> (batch_id IS NULL));
CREATE INDEX webhook_deliveries_batch ON webhook_deliveries (batch_id, created_at) WHERE batch_id IS NOT NULL;

-- As for jobs: the event is written in the transaction that ends the batch, whatever ends it.
CREATE FUNCTION batch_webhook_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delivery uuid := gen_random_uuid();
BEGIN
    INSERT INTO webhook_deliveries (id, batch_id, tenant_id, event, url, batch)
    VALUES (delivery, NEW.id, NEW.tenant_id, 'batch.' || NEW.status, NEW.webhook_url, to_jsonb(NEW));
    PERFORM pg_notify('switchyard_webhooks', delivery::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER batches_webhook_event
    AFTER UPDATE OF status ON batches
    FOR EACH ROW
    WHEN (NEW.webhook_url IS NOT NULL AND NEW.status IS DISTINCT FROM OLD.status
          AND NEW.status IN ('completed', 'failed', 'expired', 'cancelled'))
    EXECUTE FUNCTION batch_webhook_event();

-- A batch refused by validation is stored `failed` at once.
CREATE TRIGGER batches_webhook_event_created
    AFTER INSERT ON batches
    FOR EACH ROW
    WHEN (NEW.webhook_url IS NOT NULL AND NEW.status IN ('completed', 'failed', 'expired', 'cancelled'))
    EXECUTE FUNCTION batch_webhook_event();
