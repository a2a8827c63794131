-- Per-tenant limits an operator sets (`python -m ops.admin set-limits`); a limit absent here is the
-- deployment's default (tasks/settings.py). Keys: submit_rate, submit_burst, max_attempts, max_waits.
-- depends: 0009_retention

ALTER TABLE tenants ADD COLUMN limits jsonb NOT NULL DEFAULT '{}'::jsonb;
