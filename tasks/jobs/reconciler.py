"""The reconciler: finds jobs the happy path stranded and puts them back on it, through the lifecycle.

It runs as a thread in every router process; a Redis lock, extended while a sweep runs, lets one sweep
run at a time cluster-wide. Each sweep compares Postgres (the truth about jobs) with Redis (the truth
about live nodes and messages):

- outcomes a worker parked in Redis while Postgres was away are recorded;
- routed or running on a node whose heartbeat expired (SIGKILL, power loss, a drained node that
  left): the job goes back to `queued` as its next attempt and is re-routed at once, without waiting
  for Redis's visibility timeout. A worker that keeps dying on a job uses up its attempts: `dead`;
- routed for longer than settings.redispatch_after, but its message is on neither its node's queue
  nor that node's unacknowledged list (a publish that failed, a router that died between marking the
  job and publishing, a message Redis lost): the message is sent to the node again;
- running past job_timeout on a live node (a wedged node): re-queued like a lost one;
- queued long after it was due (settings.redispatch_after) and not waiting its turn in the fair
  queue: its route message was lost, or the API crashed between the commit and the publish, or a
  dispatcher died holding it; the job is published again.

- past the Cancel-After deadline its client gave at submit: cancelled, like a client's cancel.

About once an hour it also deletes finished jobs past settings.retention_days (tasks/jobs/retention.py).

It does the same for RAG documents whose ingestion stalled (an ingest worker that died mid-document, a
lost message): tasks/ingest/recovery.py.

Every transition is conditional on (status, attempt), so a sweep racing a worker, or two sweeps,
cannot double anything: the stale side's update simply matches no row.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from redis.exceptions import LockError

from tasks.batches import progress as batch_progress
from tasks import metrics
from tasks.errors import TRANSIENT, ErrorKind, JobError
from tasks.ingest import recovery as ingest_recovery
from tasks.jobs import lifecycle, retention, stranded
from tasks.logs import job_fields
from tasks.names import node_queue, route_queue
from tasks.routing import fair_queue, registry
from tasks.routing.strategies import NAMES as STRATEGIES

log = logging.getLogger(__name__)

LOCK_KEY = "switchyard:reconciler:lock"
#: the last sweeps, newest first ("holder started ended" in Unix seconds), for operators and tests
SWEEPS_KEY = "switchyard:reconciler:sweeps"
_SWEEPS_KEPT = 200
_RESYNC_EVERY = 30  # sweeps between checks of the assigned sets against Postgres
_PURGE_EVERY = 3600.0
_STALLED_PAGE = 5000  # queued jobs looked at per check  # seconds between retention purges (tasks/jobs/retention.py)


class Reconciler:
    def __init__(self, app):
        self.app, self.settings = app, app.settings
        self.sweeps = 0
        self.trust_heartbeats_after = 0.0
        self._next_message_check = 0.0
        self._next_document_check = 0.0
        self._next_purge = 0.0
        self._queued_cursor = None  # where the next look at long-queued jobs starts (see _republish_stalled)
        # The lock outlives a sweep's expected length several times over, and is extended as the sweep
        # goes: another router's reconciler never starts while this one is still at work.
        self._lock = app.redis.lock(LOCK_KEY, timeout=max(5.0, 5 * self.settings.reconcile_interval),
                                    blocking=False, thread_local=False)

    def run_forever(self, stop: threading.Event) -> None:
        failing = False
        while not stop.wait(self.settings.reconcile_interval):
            try:
                if failing:  # back after an outage: route messages taken before it are stuck unacked
                    for strategy in STRATEGIES:
                        self.app.restore_unacked(route_queue(strategy))
                    # Heartbeats lapsed during the outage too: give nodes one TTL to show up again
                    # before their jobs are taken away from them.
                    self.trust_heartbeats_after = time.monotonic() + self.settings.heartbeat_ttl
                    failing = False
                self.sweep()
            except TRANSIENT:  # an outage: the next sweep retries, and first restores what it stranded
                failing = True
                log.exception("reconciler sweep failed: Redis or Postgres unreachable")
            except Exception:  # noqa: BLE001 - a bug must not end the reconciler either
                log.exception("reconciler sweep failed")

    def sweep(self) -> dict[str, int]:
        """One pass; returns what it did (for logs and tests). Skipped if another router holds the lock."""
        if not self._lock.acquire():
            return {}
        started = time.time()
        try:
            counts = self._sweep()
        except LockError:
            log.warning("reconciler lock lost mid-sweep (Redis was too slow to answer); stopping this sweep")
            counts = {}
        finally:
            self._release_lock()
        metrics.reconciler_sweep(counts, time.time() - started)
        self.app.redis.pipeline().lpush(SWEEPS_KEY, f"{self.settings.node_id} {started:.3f} {time.time():.3f}") \
            .ltrim(SWEEPS_KEY, 0, _SWEEPS_KEPT - 1).execute()
        if any(counts.values()):
            log.warning("reconciler: %s", counts)
        return counts

    def _still_mine(self) -> None:
        """Extend the lock; raises LockError if it was lost (the sweep then stops where it is)."""
        self._lock.reacquire()

    def _release_lock(self) -> None:
        try:
            self._lock.release()
        except LockError:
            log.warning("reconciler lock expired during a sweep")

    def _sweep(self) -> dict[str, int]:
        s, redis, pool = self.settings, self.app.redis, self.app.db
        self.sweeps += 1
        counts = {"parked": lifecycle.finish_parked(self.app, each=self._still_mine), "rerouted": 0, "taken_back": 0,
                  "dead": 0, "resent": 0, "republished": 0, "documents_resent": 0, "deadline_cancelled": 0, "purged": 0}
        nodes = registry.live_nodes(redis)
        live = {n["id"] for n in nodes}

        trusted = time.monotonic() >= self.trust_heartbeats_after
        orphans = stranded.jobs_on_nodes_not_in(pool, sorted(live)) if trusted else []
        for job in orphans:
            message = f"node {job['node_id']} stopped heartbeating with the job {job['status']}"
            self._requeue(job, message, counts)
        for node_id in {j["node_id"] for j in orphans}:
            registry.forget_node(redis, node_id)

        for job in stranded.overdue_jobs(pool, routed_for=s.visibility_timeout, running_for=s.job_timeout + 60):
            self._requeue(job, f"node {job['node_id']} held the job {job['status']} past its deadline", counts,
                          action="taken_back")

        if time.monotonic() >= self._next_message_check:
            # Reading a node's whole queue, or every long-queued job, is not free: look at most a few
            # times per period.
            self._next_message_check = time.monotonic() + s.redispatch_after / 3
            counts["resent"] = self._resend_lost_messages(live)
            counts["republished"] = self._republish_stalled()

        for job in stranded.past_their_deadline(pool):
            self._still_mine()
            if lifecycle.cancel(self.app, job["id"], job["tenant_id"], reason="its Cancel-After deadline passed"):
                counts["deadline_cancelled"] += 1

        counts["batches_ended"] = batch_progress.advance(self.app, each=self._still_mine)

        if time.monotonic() >= self._next_document_check:
            self._next_document_check = time.monotonic() + min(s.ingest_stall_after / 3, 60)
            counts["documents_resent"] = ingest_recovery.resume_stalled(self.app, each=self._still_mine)

        if s.retention_days and time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + _PURGE_EVERY
            counts["purged"] = retention.purge(pool, s.retention_days, each=self._still_mine)

        if self.sweeps % _RESYNC_EVERY == 0:
            self._resync_assigned(live)
        return counts

    def _republish_stalled(self) -> int:
        """Queued jobs long due that are neither waiting in the fair queue nor, after all this time,
        on a route queue: published again. Jobs waiting their turn are paged through (never written),
        so a long fair-queue backlog costs reads, not updates."""
        s = self.settings
        rows = stranded.stalled_queued(self.app.db, older_than=s.redispatch_after, after=self._queued_cursor,
                                       limit=_STALLED_PAGE)
        self._queued_cursor = rows[-1]["queued_at"] if len(rows) == _STALLED_PAGE else None
        ids = [r["id"] for r in rows]
        waiting = fair_queue.pending(self.app.redis, ids)
        republished = 0
        for job in stranded.claim_queued(self.app.db, [i for i in ids if i not in waiting],
                                         older_than=s.redispatch_after):
            self._still_mine()
            lifecycle.redispatch(self.app, job)
            republished += 1
        return republished

    def _requeue(self, job: dict, message: str, counts: dict, action: str = "rerouted") -> None:
        self._still_mine()
        outcome = lifecycle.requeue_lost(self.app, job, JobError(ErrorKind.WORKER_LOST, message))
        if outcome == "queued":
            counts[action] += 1
        elif outcome == "dead":
            counts["dead"] += 1

    def _resend_lost_messages(self, live: set[str]) -> int:
        suspects = [j for j in stranded.routed_longer_than(self.app.db, self.settings.redispatch_after)
                    if j["node_id"] in live]
        if not suspects:
            return 0
        present = self._messages_held({j["node_id"] for j in suspects})
        resent = 0
        for job in suspects:
            if registry.member(job["id"], job["attempt"]) not in present:
                self._still_mine()
                log.warning("job %s: routed to %s but its message is gone; sending it again", job["id"], job["node_id"],
                            extra=job_fields(job["id"], job["attempt"], job["node_id"], job.get("tenant_id")))
                lifecycle.send_to_node(self.app, job["id"], job["attempt"], job["node_id"])
                resent += 1
        return resent

    def _messages_held(self, node_ids: set[str]) -> set[str]:
        """Task ids (job:attempt members) of the generate messages waiting on these nodes' queues or
        delivered to them and not yet acknowledged."""
        queues = {node_queue(n) for n in node_ids}
        held: set[str] = set()
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in queues:
                self._still_mine()
                held.update(json.loads(raw)["headers"]["id"] for raw in channel.client.lrange(queue, 0, -1))
            self._still_mine()
            for _tag, raw in channel.client.hscan_iter(channel.unacked_key):
                payload, _exchange, routing_key = json.loads(raw)
                if routing_key in queues:
                    held.add(payload["headers"]["id"])
        return held

    def _resync_assigned(self, live: set[str]) -> None:
        """Drop members of assigned sets whose job has ended or moved (a worker died before releasing)."""
        redis = self.app.redis
        for node_id in live:
            self._still_mine()
            members = [m.decode() for m in redis.smembers(registry.assigned_key(node_id))]
            if not members:
                continue
            pairs = [m.rsplit(":", 1) for m in members]
            current = stranded.active_attempts(self.app.db, [p[0] for p in pairs])
            stale = [m for m, (job_id, attempt) in zip(members, pairs)
                     if current.get(job_id) not in ((int(attempt), node_id), (int(attempt), None))]
            registry.release(redis, node_id, stale)


def reconcile_forever(app) -> threading.Event:
    """Start the reconciler thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=Reconciler(app).run_forever, args=(stop,), daemon=True, name="reconciler").start()
    return stop
