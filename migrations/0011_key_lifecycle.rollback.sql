DROP TABLE audit_log;
DROP INDEX api_keys_tenant;
ALTER TABLE api_keys DROP COLUMN name, DROP COLUMN scopes, DROP COLUMN expires_at;
