DROP TRIGGER jobs_webhook_event ON jobs;
DROP FUNCTION webhook_event();
DROP TABLE webhook_attempts;
DROP TABLE webhook_deliveries;
DROP TABLE webhook_endpoints;
DROP TABLE webhook_secrets;
ALTER TABLE jobs DROP COLUMN webhook;
