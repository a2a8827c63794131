"""The webhook dispatcher: puts due deliveries on the `webhooks` queue.

Run as many as you like (one per webhooks worker): dispatchers lease rows with FOR UPDATE SKIP LOCKED,
and each attempt is fenced by its number, so nothing is sent twice.
"""

from __future__ import annotations

import logging
import threading

import psycopg

from tasks.names import DELIVER_TASK, WEBHOOKS_QUEUE
from tasks.webhooks import store

log = logging.getLogger(__name__)


class Dispatcher(threading.Thread):
    """Enqueues due deliveries: woken by the trigger's NOTIFY at commit, and sweeping every
    `webhook_sweep_interval` seconds for retries that came due and anything a NOTIFY missed (a
    dispatcher that was down, a crash between commit and enqueue)."""

    batch = 500
    coalesce = 0.005  # seconds
    queue_limit = 2000  # messages waiting on the `webhooks` queue, beyond which nothing more is dispatched

    def __init__(self, app, stop: threading.Event):
        super().__init__(name="webhook-dispatcher", daemon=True)
        self.app, self.settings, self.stop = app, app.settings, stop

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {store.NOTIFY_CHANNEL}")
                    while not self.stop.is_set():
                        self.dispatch_due()
                        self.wait(conn)
            except Exception:  # noqa: BLE001 - Postgres or Redis away: keep trying, the rows wait
                log.exception("webhook dispatcher failed; retrying in 1 s")
                self.stop.wait(1)

    def wait(self, conn) -> None:
        """Until a NOTIFY or the next sweep; then a few ms more, so a burst of commits is one claim."""
        woken = any(True for _ in conn.notifies(timeout=self.settings.webhook_sweep_interval, stop_after=1))
        if woken:
            for _ in conn.notifies(timeout=self.coalesce):
                pass

    def dispatch_due(self) -> int:
        sent = 0
        while True:
            # Back-pressure: a backlog longer than the lease would only be dispatched again.
            room = min(self.batch, self.queue_limit - self.app.redis.llen(WEBHOOKS_QUEUE))
            if room <= 0:
                return sent
            rows = store.claim_due(self.app.db, limit=room, lease_seconds=self.settings.webhook_dispatch_lease,
                                   per_tenant=self.settings.webhook_tenant_inflight)
            for i, row in enumerate(rows):
                try:
                    self.app.send_task(DELIVER_TASK, args=[str(row["id"]), row["attempts"] + 1], queue=WEBHOOKS_QUEUE)
                except Exception:
                    store.release(self.app.db, [r["id"] for r in rows[i:]])
                    raise
            sent += len(rows)
            if len(rows) < room:
                return sent
