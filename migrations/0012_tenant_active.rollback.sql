DROP INDEX jobs_tenant_active;
