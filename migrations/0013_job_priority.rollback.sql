DROP INDEX jobs_queued;
ALTER TABLE jobs DROP COLUMN priority;
