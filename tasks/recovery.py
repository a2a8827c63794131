"""The reconciler: finds jobs the happy path stranded and puts them back on it.

It runs as a thread in every router process; a Redis lock lets one sweep run at a time cluster-wide.
Each sweep compares Postgres (the truth about jobs) with Redis (the truth about live nodes):

- routed or running on a node whose heartbeat expired (SIGKILL, power loss, a drained node that
  left): the job goes back to `queued` as its next attempt and is re-routed at once, without waiting
  for Redis's visibility timeout. A worker that keeps dying on a job uses up its attempts: `dead`.
- routed for longer than the visibility timeout, or running past job_timeout, on a live node (a lost
  node-queue message, a wedged node): the same.
- queued long after it was due (settings.redispatch_after): its route message was lost, or the API
  crashed between the commit and the publish; the job is published again.

Every transition is conditional on (status, attempt), so a sweep racing a worker, or two sweeps,
cannot double anything: the stale side's update simply matches no row.
"""

from __future__ import annotations

import logging
import threading
import time

from tasks import notify, registry, store
from tasks.retry import backoff
from tasks.celery_app import route_queue
from tasks.router import publish
from tasks.settings import ROUTING_STRATEGIES

log = logging.getLogger(__name__)

_LOCK_KEY = "switchyard:reconciler:lock"
_RESYNC_EVERY = 30  # sweeps between checks of the assigned sets against Postgres


class Reconciler:
    def __init__(self, app):
        self.app, self.settings = app, app.settings
        self.sweeps = 0
        self.trust_heartbeats_after = 0.0

    def run_forever(self, stop: threading.Event) -> None:
        failing = False
        while not stop.wait(self.settings.reconcile_interval):
            try:
                if failing:  # back after an outage: route messages taken before it are stuck unacked
                    for strategy in ROUTING_STRATEGIES:
                        self.app.restore_unacked(route_queue(strategy))
                    # Heartbeats lapsed during the outage too: give nodes one TTL to show up again
                    # before their jobs are taken away from them.
                    self.trust_heartbeats_after = time.monotonic() + self.settings.heartbeat_ttl
                    failing = False
                self.sweep()
            except Exception:  # noqa: BLE001 - an outage must not end the reconciler; the next sweep retries
                failing = True
                log.exception("reconciler sweep failed")

    def sweep(self) -> dict[str, int]:
        """One pass; returns what it did (for logs and tests). Skipped if another router holds the lock."""
        s, redis, pool = self.settings, self.app.redis, self.app.db
        if not redis.set(_LOCK_KEY, s.node_id, nx=True, px=int(max(1.0, s.reconcile_interval) * 1000)):
            return {}
        self.sweeps += 1
        nodes = registry.live_nodes(redis)
        live = {n["id"] for n in nodes}
        counts = {"rerouted": 0, "dead": 0, "republished": 0}

        # A job waiting on a shared pull queue (a `pull:` pseudo node) is not an orphan while a live node
        # consumes that queue.
        owners = live | {p for n in nodes for p in n.get("pulls", ())}
        trusted = time.monotonic() >= self.trust_heartbeats_after
        orphans = store.jobs_on_nodes_not_in(pool, sorted(owners)) if trusted else []
        for job in orphans:
            message = f"node {job['node_id']} stopped heartbeating with the job {job['status']}"
            self._retry(job, {"type": "worker_lost", "message": message}, counts)
        for node_id in {j["node_id"] for j in orphans}:
            registry.forget_node(redis, node_id)

        overdue = store.overdue_jobs(pool, routed_for=s.visibility_timeout, running_for=s.job_timeout + 60)
        for job in overdue:
            self._retry(job, {"type": "worker_lost",
                              "message": f"node {job['node_id']} held the job {job['status']} past its deadline"},
                        counts)

        for job in store.claim_stalled_queued(pool, older_than=s.redispatch_after):
            publish(self.app, job)
            counts["republished"] += 1

        if self.sweeps % _RESYNC_EVERY == 0:
            self._resync_assigned(live)
        if any(counts.values()):
            log.warning("reconciler: %s", counts)
        return counts

    def _retry(self, job: dict, error: dict, counts: dict) -> None:
        outcome = requeue_lost(self.app, job, error)
        if outcome == "queued":
            counts["rerouted"] += 1
        elif outcome == "dead":
            counts["dead"] += 1

    def _resync_assigned(self, live: set[str]) -> None:
        """Drop members of assigned sets whose job has ended or moved (a worker died before releasing)."""
        redis = self.app.redis
        for node_id in live:
            members = [m.decode() for m in redis.smembers(registry.assigned_key(node_id))]
            if not members:
                continue
            pairs = [m.rsplit(":", 1) for m in members]
            current = store.active_attempts(self.app.db, [p[0] for p in pairs])
            stale = [m for m, (job_id, attempt) in zip(members, pairs)
                     if current.get(job_id) not in ((int(attempt), node_id), (int(attempt), None))]
            registry.release(redis, node_id, stale)


def requeue_lost(app, job: dict, error: dict) -> str | None:
    """Take a job (id, attempt, node_id, status) back from a node that lost it: re-queue it, or bury
    it when its attempts are used up. Returns the job's new status, or None if it had moved on.

    A job that was only waiting on the node is blameless: it is re-routed at once, its budget of
    attempts untouched. One that was running there is charged an attempt (so a job that kills every
    worker it runs on ends `dead`) and waits a jittered back-off, which also separates it from the
    jobs that were running beside it."""
    s = app.settings
    running = job["status"] == "running"
    delay = backoff(job["attempt"], base=s.retry_backoff_base, cap=s.retry_backoff_max) if running else 0.0
    row = store.retry_job(app.db, job["id"], job["attempt"], error, delay=delay, charge=running)
    registry.release(app.redis, job["node_id"], [registry.member(job["id"], job["attempt"])])
    if row is None:
        return None
    if row["status"] == "queued":
        publish(app, row, countdown=delay)
    else:
        notify.job_finished(app.redis, job["id"])
    return row["status"]


def reconcile_forever(app) -> threading.Event:
    """Start the reconciler thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=Reconciler(app).run_forever, args=(stop,), daemon=True, name="reconciler").start()
    return stop
