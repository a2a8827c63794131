-- Webhook callbacks (issue 5): a job's webhook, per-tenant signing secrets, endpoints disabled by a
-- 410, one delivery row per event (its id is the Standard Webhooks `webhook-id`), and every attempt.
-- depends: 0002_delivery

ALTER TABLE jobs ADD COLUMN webhook jsonb;  -- {"url": "...", "events": ["job.succeeded", ...]} or NULL

-- Standard Webhooks secrets ("whsec_" + base64). The tenant reads its secret through the API, so it is
-- stored as is. One current secret per tenant (expires_at NULL); a rotation gives the old one an
-- expiry, and until then deliveries are signed with both.
CREATE TABLE webhook_secrets (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz
);
CREATE UNIQUE INDEX webhook_secrets_current ON webhook_secrets (tenant_id) WHERE expires_at IS NULL;

-- A receiver that answers 410 Gone disables its URL for that tenant until the tenant re-enables it.
CREATE TABLE webhook_endpoints (
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url             text NOT NULL,
    disabled_at     timestamptz,
    disabled_reason text,
    PRIMARY KEY (tenant_id, url)
);

-- One row per event. `job` is the job row as it was when the event happened, so every retry sends the
-- same body. `attempts` counts claimed attempts and fences duplicate task messages; `lease_until`
-- keeps a claimed row from being dispatched twice; `next_attempt_at` drives the back-off schedule.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    job_id           uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    event            text NOT NULL,
    url              text NOT NULL,
    job              jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer,                    -- NULL: the schedule's; a manual retry allows one more
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_status_code integer,
    last_error       text
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

-- Every attempt: written when the attempt is claimed (so one lost with its worker still shows), then
-- completed with its outcome.
CREATE TABLE webhook_attempts (
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    status_code  integer,
    latency_ms   double precision,
    error        text,
    PRIMARY KEY (delivery_id, attempt)
);

-- The event is written in the same transaction as the status change, whichever code path makes it,
-- and the dispatcher is woken at commit; it also sweeps due rows, so a missed NOTIFY only delays.
CREATE FUNCTION webhook_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event text := 'job.' || NEW.status;
    delivery uuid := gen_random_uuid();
BEGIN
    IF NOT coalesce(NEW.webhook -> 'events' ? event, false) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (id, job_id, tenant_id, event, url, job)
    VALUES (delivery, NEW.id, NEW.tenant_id, event, NEW.webhook ->> 'url', to_jsonb(NEW));
    PERFORM pg_notify('switchyard_webhooks', delivery::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_webhook_event
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW
    WHEN (NEW.webhook IS NOT NULL AND NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION webhook_event();
