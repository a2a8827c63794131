DROP INDEX jobs_cancel_at;
ALTER TABLE jobs DROP COLUMN cancel_at;
