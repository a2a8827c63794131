-- Retention (settings.retention_days): the reconciler purges finished jobs (their attempts, dead letters,
-- idempotency keys and webhook deliveries go with them by cascade) once they are old enough.
-- depends: 0008_cancel_after

CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE status IN ('succeeded', 'failed', 'cancelled', 'dead');
