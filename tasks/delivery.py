"""Webhook delivery: one attempt of one delivery, and the Celery task that runs it on the `webhooks` queue.

An attempt re-checks the URL with the SSRF guard, connects to the address that was checked (the Host
header and TLS SNI carry the name), signs the body per Standard Webhooks and follows no redirect. Only
a 2xx delivers. A 410 disables the tenant's endpoint; anything else is retried on the back-off schedule
(or later, when the receiver's Retry-After asks for it) until the last attempt dead-letters it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import psycopg
import urllib3
from celery import shared_task

from tasks import signing, ssrf, webhooks
from tasks.settings import Settings

DELIVER_TASK = "switchyard.deliver_webhook"
QUEUE = "webhooks"
USER_AGENT = "Switchyard-Webhooks/1"
_ANSWER_BYTES = 1024  # of the receiver's answer, read (and kept in the log for a failure)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    """What one attempt got: an HTTP status, or an error (refused by the guard, timeout, refused...)."""

    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    retry_after: float | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# --- the body -----------------------------------------------------------------------------------

_TIMESTAMPS = ("created_at", "routed_at", "started_at", "finished_at")


def payload(delivery: dict) -> bytes:
    """The event as sent, identical on every attempt: the job resource as GET /v1/jobs/{id} showed it
    when the event happened (the trigger's snapshot), plus the event type."""
    from api.resources import job_resource  # the one definition of the job resource (a pure function)

    row = dict(delivery["job"])
    for key in _TIMESTAMPS:
        if row.get(key):
            row[key] = datetime.fromisoformat(row[key])
    event = {"type": delivery["event"], "timestamp": delivery["created_at"].isoformat(), "data": job_resource(row)}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


# --- HTTP ---------------------------------------------------------------------------------------


def _host_header(target: ssrf.Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == ssrf.DEFAULT_PORTS[target.scheme] else f"{host}:{target.port}"


def _connection_pool(target: ssrf.Target, timeout: float) -> urllib3.HTTPConnectionPool:
    common = {"host": target.address, "port": target.port, "maxsize": 1, "retries": False,
              "timeout": urllib3.Timeout(connect=timeout, read=timeout)}
    if target.scheme == "https":
        # The certificate is checked against the name, though the socket goes to the checked address.
        return urllib3.HTTPSConnectionPool(**common, server_hostname=target.host, assert_hostname=target.host,
                                           cert_reqs="CERT_REQUIRED")
    return urllib3.HTTPConnectionPool(**common)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def post(target: ssrf.Target, body: bytes, headers: dict, timeout: float) -> Response:
    """POST once, redirects not followed; a transport error is returned as the response's error."""
    started = time.monotonic()
    try:
        with _connection_pool(target, timeout) as pool:
            answer = pool.urlopen("POST", target.path, body=body, headers={**headers, "Host": _host_header(target)},
                                  redirect=False, retries=False, assert_same_host=False, preload_content=False)
            latency = (time.monotonic() - started) * 1000
            text = answer.read(_ANSWER_BYTES, decode_content=False).decode("utf-8", "replace")
            answer.release_conn()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return Response(latency_ms=(time.monotonic() - started) * 1000, error=f"{type(exc).__name__}: {exc}")
    error = None if 200 <= answer.status < 300 else f"HTTP {answer.status}: {text.strip()[:200]}"
    return Response(answer.status, latency, error, _retry_after(answer.headers.get("Retry-After")))


def send(pool, settings: Settings, delivery: dict) -> Response:
    """Guard, sign and POST one delivery."""
    body = payload(delivery)
    try:
        target = ssrf.check_url(delivery["url"], ssrf.AllowList.parse(settings.webhook_allow))
    except ssrf.UnresolvableURL as exc:
        return Response(error=str(exc))  # DNS may come back: retried
    except ssrf.UnsafeURL as exc:
        return Response(error=f"refused: {exc}", refused=True)
    secrets = delivery["secrets"] if delivery["has_current"] else webhooks.signing_secrets(pool, delivery["tenant_id"])
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               **signing.headers(secrets, str(delivery["id"]), int(time.time()), body)}
    return post(target, body, headers, settings.webhook_timeout)


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
    delivery = webhooks.begin_attempt(pool, delivery_id, attempt, lease_seconds=3 * settings.webhook_timeout + 60)
    if delivery is None:
        return "stale"
    if delivery["disabled_at"] is not None:
        webhooks.finish_attempt(pool, delivery_id, attempt, status="dead",
                                error=f"not sent: the endpoint is disabled ({delivery['disabled_reason']})")
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
    webhooks.finish_attempt(pool, delivery_id, attempt, status=status, delay=delay,
                            status_code=response.status_code, latency_ms=response.latency_ms, error=error)
    if response.status_code == 410:  # after recording this attempt: disabling dead-letters what still waits
        webhooks.disable_endpoint(pool, delivery["tenant_id"], delivery["url"],
                                  f"410 Gone from the receiver at attempt {attempt} of delivery {delivery_id}")
    log.info("webhook %s attempt %d → %s (%s)", delivery_id, attempt, status, response.status_code or error)
    return status


# Postgres errors are retried by Celery; the attempt fence makes a retry after the claim a no-op, and
# the row's lease then lets the dispatcher hand it out again as the next attempt.
@shared_task(name=DELIVER_TASK, bind=True, queue=QUEUE, acks_late=True, ignore_result=True, max_retries=5,
             autoretry_for=(psycopg.OperationalError,), retry_backoff=True, retry_backoff_max=30, retry_jitter=True)
def deliver_webhook(self, delivery_id: str, attempt: int) -> str:
    return deliver(self.app.db, self.app.settings, delivery_id, attempt)
