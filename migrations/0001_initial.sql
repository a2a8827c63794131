-- Switchyard initial schema: tenants, hashed API keys, jobs.
-- depends:

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE tenants (
    id               uuid PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    default_strategy text,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Keys are high-entropy random tokens, so a SHA-256 digest is enough to store them safely; the clear
-- key is shown once, when it is created. `prefix` lets an operator tell keys apart in listings.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_hash    bytea NOT NULL UNIQUE,
    prefix      text NOT NULL,
    is_admin    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,          -- uuid4 from a CSPRNG: cannot be guessed
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    status           text NOT NULL CHECK (status IN
                         ('queued', 'routed', 'running', 'succeeded', 'failed', 'cancelled', 'dead')),
    model            text NOT NULL,
    routing_strategy text NOT NULL,
    request          jsonb NOT NULL,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    result           jsonb,
    error            jsonb,
    attempt          integer NOT NULL DEFAULT 1,  -- fencing token: every transition names the attempt
    node_id          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    routed_at        timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz
);

CREATE INDEX jobs_tenant_listing ON jobs (tenant_id, created_at DESC, id DESC);
CREATE INDEX jobs_active ON jobs (status, created_at) WHERE status IN ('queued', 'routed', 'running');
