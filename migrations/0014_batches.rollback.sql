DROP TRIGGER batches_webhook_event_created ON batches;
DROP TRIGGER batches_webhook_event ON batches;
DROP FUNCTION batch_webhook_event();
DELETE FROM webhook_deliveries WHERE batch_id IS NOT NULL;
DROP INDEX webhook_deliveries_batch;
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_subject,
                               DROP COLUMN batch,
                               DROP COLUMN batch_id,
                               ALTER COLUMN job SET NOT NULL,
                               ALTER COLUMN job_id SET NOT NULL;
DELETE FROM jobs WHERE batch_id IS NOT NULL;
DROP INDEX jobs_batch_active;
DROP INDEX jobs_batch_custom_id;
ALTER TABLE jobs DROP COLUMN custom_id, DROP COLUMN batch_line, DROP COLUMN batch_id;
DROP TABLE batches;
DROP TABLE files;
