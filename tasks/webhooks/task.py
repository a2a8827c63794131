"""The webhook delivery task: one attempt of one delivery, on the `webhooks` queue.

Only a 2xx delivers. A 410 disables the tenant's endpoint; anything else is retried on the back-off
schedule (or later, when the receiver's Retry-After asks for it) until the last attempt dead-letters it.
"""

from __future__ import annotations

import logging
import random

from celery import shared_task

from tasks import metrics
from tasks.errors import TRANSIENT
from tasks.names import DELIVER_TASK, WEBHOOKS_QUEUE
from tasks.settings import Settings
from tasks.webhooks import store
from tasks.webhooks.sender import Response, send

log = logging.getLogger(__name__)


# --- the outcome --------------------------------------------------------------------------------


def retry_delay(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Seconds before attempt `attempt + 1`: the schedule's, with jitter, or the receiver's Retry-After
    when that is longer (capped at the schedule's longest delay)."""
    schedule = settings.webhook_retry_schedule
    base = schedule[min(attempt, len(schedule)) - 1]
    delay = base * random.uniform(1 - settings.webhook_retry_jitter, 1 + settings.webhook_retry_jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max(schedule)))
    return delay


def deliver(pool, settings: Settings, delivery_id: str, attempt: int) -> str:
    """Make attempt number `attempt` of a delivery; returns its outcome (or `stale` for a duplicate)."""
    delivery = store.begin_attempt(pool, delivery_id, attempt, lease_seconds=3 * settings.webhook_timeout + 60)
    if delivery is None:
        return "stale"
    if delivery["disabled_at"] is not None:
        store.finish_attempt(pool, delivery_id, attempt, status="dead",
                             error=f"not sent: the endpoint is disabled ({delivery['disabled_reason']})")
        metrics.webhook_attempt("dead", None)
        return "dead"
    try:
        response = send(pool, settings, delivery)
    except Exception as exc:  # noqa: BLE001 - a bug must use up attempts like any failure, not loop forever
        log.exception("webhook %s attempt %d failed inside Switchyard", delivery_id, attempt)
        response = Response(error=f"internal error: {exc!r}")
    last = delivery["max_attempts"] or len(settings.webhook_retry_schedule) + 1
    status, delay, error = "pending", 0.0, response.error
    if response.ok:
        status = "delivered"
    elif response.refused:
        status = "dead"
    elif response.status_code == 410:
        status = "dead"
    elif attempt >= last:
        status, error = "dead", f"gave up after attempt {attempt}: {error}"
    else:
        delay = retry_delay(settings, attempt, response.retry_after)
    store.finish_attempt(pool, delivery_id, attempt, status=status, delay=delay,
                         status_code=response.status_code, latency_ms=response.latency_ms, error=error)
    metrics.webhook_attempt("failed" if status == "pending" else status,
                            response.latency_ms / 1000 if response.latency_ms is not None else None)
    if response.status_code == 410:  # after recording this attempt: disabling dead-letters what still waits
        store.disable_endpoint(pool, delivery["tenant_id"], delivery["url"],
                               f"410 Gone from the receiver at attempt {attempt} of delivery {delivery_id}")
    # %r: a receiver's answer is quoted and escaped, never written raw (no forged log lines)
    log.info("webhook %s attempt %d → %s (%r)", delivery_id, attempt, status, response.status_code or error)
    return status


# Postgres errors are retried by Celery; the attempt fence makes a retry after the claim a no-op, and
# the row's lease then lets the dispatcher hand it out again as the next attempt.
@shared_task(name=DELIVER_TASK, bind=True, queue=WEBHOOKS_QUEUE, acks_late=True, ignore_result=True, max_retries=5,
             autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=30, retry_jitter=True)
def deliver_webhook(self, delivery_id: str, attempt: int) -> str:
    return deliver(self.app.db, self.app.settings, delivery_id, attempt)
