-- Priority classes: the dispatcher serves `interactive` jobs before `batch` jobs (tasks/routing/fair_queue.py).
-- depends: 0012_tenant_active

ALTER TABLE jobs ADD COLUMN priority text NOT NULL DEFAULT 'interactive'
    CONSTRAINT jobs_priority_known CHECK (priority IN ('interactive', 'batch'));

-- The reconciler pages through long-queued jobs (most of them waiting their turn in the fair queue).
CREATE INDEX jobs_queued ON jobs (queued_at) WHERE status = 'queued';
