"""A tenant whose receiver is a tarpit delays only itself: with 30 of its deliveries due ahead of
another tenant's 10, the other tenant's all arrive within seconds, because one tenant may only have
SWITCHYARD_WEBHOOK_TENANT_INFLIGHT deliveries in flight and each attempt ends at its hard deadline.

A real webhooks worker process on a database of the test's own (its dispatcher must not claim other
tests' deliveries), a tarpit that trickles one byte every 0.5 s (never a read timeout: only the
deadline ends the attempt) and the fast loopback receiver."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest

from ops.processes import ProcessGroup
from ops.testbed import fresh_database
from tasks.celery_app import create_celery
from tasks.db import make_pool
from tasks.jobs import tenants
from tests.system.webhooks.support import new_job, run_to_end, wait_until, worker_env

DEADLINE, INFLIGHT, THREADS = 2.0, 3, 6


class Tarpit:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port, self.stop, self.hits = self.sock.getsockname()[1], threading.Event(), 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 10_000:
                if self.stop.wait(0.5):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def isolated(backing, base_settings, receiver, tmp_path):
    pg, valkey = backing
    tarpit = Tarpit()
    settings = base_settings.model_copy(update={
        "database_url": fresh_database(pg.url), "redis_url": valkey.url.rsplit("/", 1)[0] + "/6",
        "webhook_allow": (f"127.0.0.1:{receiver.port}", f"127.0.0.1:{tarpit.port}"),
        "webhook_retry_schedule": (60.0,), "webhook_retry_jitter": 0.0, "webhook_sweep_interval": 0.2})
    env = {**worker_env(settings), "SWITCHYARD_WEBHOOK_ATTEMPT_DEADLINE": str(DEADLINE),
           "SWITCHYARD_WEBHOOK_TIMEOUT": "1", "SWITCHYARD_WEBHOOK_TENANT_INFLIGHT": str(INFLIGHT),
           "SWITCHYARD_WEBHOOK_CONCURRENCY": str(THREADS), "SWITCHYARD_WEBHOOK_DISPATCH_LEASE": "30",
           "SWITCHYARD_NODE_ID": "isolation"}
    workers = ProcessGroup(tmp_path / "logs", env)
    db = make_pool(settings.database_url, max_size=4, name="isolation")
    try:
        workers.start("webhooks", [sys.executable, "-m", "workers.webhook_worker"])
        app = create_celery(settings)
        workers.wait_until(lambda: any("webhooks@isolation" in r for r in app.control.ping(timeout=0.5)), 60,
                           "the webhooks worker answering a ping")
        yield db, tarpit
    finally:
        workers.stop()
        tarpit.close()
        db.close()


def test_a_tarpit_tenant_delays_only_its_own_deliveries(isolated, receiver):
    db, tarpit = isolated
    slow, _ = tenants.create_tenant(db, "tarpit-tenant")
    fast, _ = tenants.create_tenant(db, "fast-tenant")
    slow_jobs = [new_job(db, slow.id, f"http://127.0.0.1:{tarpit.port}/hook") for _ in range(30)]
    for job in slow_jobs:
        run_to_end(db, job)
    wait_until(lambda: tarpit.hits >= INFLIGHT, 10, "the tarpit holding the slow tenant's first deliveries")

    started = time.monotonic()
    fast_jobs = [new_job(db, fast.id, receiver.url("/isolation-fast")) for _ in range(10)]
    for job in fast_jobs:
        run_to_end(db, job)
    receiver.wait(lambda rs: len({r.id for r in rs if r.path == "/isolation-fast"}) >= 10, timeout=30)
    fast_took = time.monotonic() - started
    with db.connection() as conn:
        slow_pending = conn.execute("SELECT count(*) AS n FROM webhook_deliveries WHERE tenant_id = %s AND "
                                    "status = 'pending' AND attempts = 0", (slow.id,)).fetchone()["n"]

    def ended_attempts():
        with db.connection() as conn:
            return conn.execute("""SELECT a.error, a.latency_ms FROM webhook_attempts a
                                     JOIN webhook_deliveries d ON d.id = a.delivery_id
                                    WHERE d.tenant_id = %s AND a.latency_ms IS NOT NULL""", (slow.id,)).fetchall()

    slow_attempts = wait_until(ended_attempts, 3 * DEADLINE, "the tarpit's first attempts ended")
    print(f"fast tenant's 10 deliveries arrived {fast_took:.1f} s after its jobs finished, with {slow_pending} of "
          f"the tarpit tenant's 30 not yet attempted; tarpit connections so far: {tarpit.hits}")
    assert fast_took < 2 * DEADLINE + 1  # without the cap: 30 tarpit attempts ahead, 6 at a time, 2 s each
    assert slow_pending > 10  # the slow tenant's backlog waits its turn meanwhile
    assert slow_attempts and all(f"{DEADLINE:g} s deadline" in a["error"] for a in slow_attempts)
    assert all(a["latency_ms"] < (DEADLINE + 1) * 1000 for a in slow_attempts)
