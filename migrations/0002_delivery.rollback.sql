DROP TABLE idempotency_keys;
DROP TABLE dead_letters;
DROP TABLE job_attempts;
ALTER TABLE jobs DROP COLUMN affinity_key, DROP COLUMN session_id, DROP COLUMN queued_at, DROP COLUMN max_attempts;
