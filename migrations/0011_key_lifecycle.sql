-- Key lifecycle (issue 12): several live keys per tenant, each with a name, scopes and an optional
-- expiry; `admin` becomes a scope (the old flag is kept in step for one release, then dropped). Admin
-- actions (keys created, revoked, rotated; limits set; nodes drained; dead letters replayed) are written
-- to audit_log.
-- depends: 0010_tenant_limits

ALTER TABLE api_keys ADD COLUMN name text,
                     ADD COLUMN scopes text[] NOT NULL DEFAULT '{jobs:read,jobs:write,webhooks}',
                     ADD COLUMN expires_at timestamptz;
UPDATE api_keys SET scopes = scopes || '{admin}' WHERE is_admin;
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);

CREATE TABLE audit_log (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,           -- `cli`, or `key:<prefix>` of the API key that acted
    tenant_id uuid,                    -- the tenant acted on, if any
    action    text NOT NULL,           -- e.g. key.created, key.revoked, limits.set, node.drained
    target    text,
    details   jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);
