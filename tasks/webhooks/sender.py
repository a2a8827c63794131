"""The webhook HTTP sender: the body of an event, and one signed POST of it.

A send re-checks the URL with the SSRF guard, connects to the address that was checked (the Host
header and TLS SNI carry the name), signs the body per Standard Webhooks and follows no redirect.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import urllib3

from tasks.batches.resource import batch_resource
from tasks.jobs.resource import job_resource
from tasks.settings import Settings
from tasks.webhooks import signing, ssrf, store
from tasks.webhooks.sealing import SecretBox

USER_AGENT = "Switchyard-Webhooks/1"
_ANSWER_BYTES = 1024  # of the receiver's answer, read (and kept in the log for a failure)


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

#: every timestamp the job resource shows (tasks.jobs.resource): the trigger's snapshot holds them as text
_TIMESTAMPS = ("created_at", "routed_at", "started_at", "retrieval_started_at", "retrieved_at", "finished_at",
               "cancel_at")


def payload(delivery: dict) -> bytes:
    """The event as sent, identical on every attempt: the job resource as GET /v1/jobs/{id} showed it
    when the event happened (the trigger's snapshot), plus the event type."""
    if delivery.get("batch") is not None:
        return _batch_payload(delivery)
    row = dict(delivery["job"])
    for key in _TIMESTAMPS:
        if row.get(key):
            row[key] = datetime.fromisoformat(row[key])
    event = {"type": delivery["event"], "timestamp": delivery["created_at"].isoformat(), "data": job_resource(row)}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _batch_payload(delivery: dict) -> bytes:
    """A batch event (`batch.completed`, ...) in OpenAI's webhook event shape, so the `openai` client's
    `webhooks.unwrap()` reads it: `id` (`evt_` + the delivery id), `object`, `type`, `created_at`, and
    `data`, here the whole Batch object as it was when the batch ended; plus the `timestamp` of job events."""
    created = delivery["created_at"]
    event = {"id": "evt_" + uuid.UUID(str(delivery["id"])).hex, "object": "event", "type": delivery["event"],
             "created_at": int(created.timestamp()), "timestamp": created.isoformat(),
             "data": batch_resource(delivery["batch"])}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


# --- HTTP ---------------------------------------------------------------------------------------


def _host_header(target: ssrf.Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == ssrf.DEFAULT_PORTS[target.scheme] else f"{host}:{target.port}"


class _Deadline:
    """A hard wall-clock limit on one attempt. urllib3's timeouts bound each connect and each read, so
    a receiver that trickles its answer a byte at a time would hold the attempt open for ever; at the
    deadline this shuts the attempt's socket down, and whatever read is blocked on it ends at once."""

    def __init__(self, seconds: float):
        self.seconds, self.expired, self._sock = seconds, False, None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                self._shut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


def _connection_pool(target: ssrf.Target, timeout: float, deadline: _Deadline) -> urllib3.HTTPConnectionPool:
    common = {"host": target.address, "port": target.port, "maxsize": 1, "retries": False,
              "timeout": urllib3.Timeout(connect=min(timeout, deadline.seconds), read=timeout)}
    if target.scheme == "https":
        # The certificate is checked against the name, though the socket goes to the checked address.
        pool = urllib3.HTTPSConnectionPool(**common, server_hostname=target.host, assert_hostname=target.host,
                                           cert_reqs="CERT_REQUIRED")
    else:
        pool = urllib3.HTTPConnectionPool(**common)

    class Watched(pool.ConnectionCls):  # hands its TCP socket to the deadline before any TLS handshake
        def _new_conn(self):
            sock = super()._new_conn()
            deadline.watch(sock)
            return sock

    pool.ConnectionCls = Watched
    return pool


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


def post(target: ssrf.Target, body: bytes, headers: dict, timeout: float, deadline: float | None = None) -> Response:
    """POST once, redirects not followed; a transport error is returned as the response's error.
    `timeout` bounds the connect and each read; `deadline` (default: 3 × timeout) the whole attempt."""
    started = time.monotonic()
    try:
        with _Deadline(deadline or 3 * timeout) as limit, _connection_pool(target, timeout, limit) as pool:
            answer = pool.urlopen("POST", target.path, body=body, headers={**headers, "Host": _host_header(target)},
                                  redirect=False, retries=False, assert_same_host=False, preload_content=False)
            latency = (time.monotonic() - started) * 1000
            text = answer.read(_ANSWER_BYTES, decode_content=False).decode("utf-8", "replace")
            answer.release_conn()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        elapsed = (time.monotonic() - started) * 1000
        if limit.expired:
            return Response(latency_ms=elapsed, error=f"no complete answer within the {limit.seconds:g} s deadline")
        return Response(latency_ms=elapsed, error=f"{type(exc).__name__}: {exc}")
    if limit.expired:  # the answer came (or a read ended) only as the socket was being shut
        return Response(latency_ms=(time.monotonic() - started) * 1000,
                        error=f"no complete answer within the {limit.seconds:g} s deadline")
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
    box = SecretBox(settings.secrets_key)
    secrets = ([box.open(s) for s in delivery["secrets"]] if delivery["has_current"]
               else store.signing_secrets(pool, delivery["tenant_id"], box))
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               **signing.headers(secrets, str(delivery["id"]), int(time.time()), body)}
    return post(target, body, headers, settings.webhook_timeout, settings.webhook_attempt_deadline)
