-- Delivery guarantees: per-job attempt limits, retry back-off, an attempt log, dead letters and
-- idempotency keys.
-- depends: 0001_initial

-- `max_attempts` is the highest attempt number this job may reach (a replay raises it).
-- `queued_at` is when the current attempt became due for routing: the reconciler re-publishes a job
-- that stays queued long past it (its message was lost, or the publish never happened).
ALTER TABLE jobs
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    ADD COLUMN queued_at    timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN session_id   text,            -- the client's conversation id (routing.session_id)
    ADD COLUMN affinity_key text;            -- what prefix-affinity routing hashes: session, else prompt prefix

-- One row per attempt outcome, written in the same statement as the job's own transition, so that
-- "exactly one accepted result per job" and "how many results were thrown away" can be counted.
CREATE TABLE job_attempts (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    node_id     text,
    -- retried: failed in a way worth another attempt, and charged for it; moved: taken off a node that
    -- died while the job was only waiting there (not charged); discarded: a result that arrived for
    -- an attempt that had been superseded or cancelled.
    outcome     text NOT NULL CHECK (outcome IN
                    ('succeeded', 'failed', 'retried', 'moved', 'dead', 'discarded')),
    error       jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_attempts_job ON job_attempts (job_id, attempt);

-- The dead-letter queue: jobs that used up their attempts. A replay puts the job back in `queued`
-- and stamps `replayed_at`; the row stays as history.
CREATE TABLE dead_letters (
    id          uuid PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    reason      text NOT NULL,
    attempts    integer NOT NULL,
    last_error  jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);
CREATE INDEX dead_letters_pending ON dead_letters (tenant_id, created_at DESC) WHERE replayed_at IS NULL;
CREATE UNIQUE INDEX dead_letters_one_open ON dead_letters (job_id) WHERE replayed_at IS NULL;

-- Idempotency-Key on POST /v1/jobs, per tenant. The body's digest tells a retry from a conflicting reuse.
CREATE TABLE idempotency_keys (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key          text NOT NULL,
    request_hash bytea NOT NULL,
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
