-- Per-tenant caps on active jobs and on the prompt tokens they hold (checked at submit).
-- depends: 0011_key_lifecycle

CREATE INDEX jobs_tenant_active ON jobs (tenant_id) WHERE status IN ('queued', 'routed', 'running');
