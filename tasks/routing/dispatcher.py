"""The dispatcher: moves jobs from the fair queue to nodes as the nodes have room.

A node takes at most its `slots` jobs (routed or running: its assigned set), the engine's seats plus
one batch in flight so the engine never idles between a finish and the next dispatch; the backlog
waits in the fair queue (tasks.routing.fair_queue), which decides whose job goes next. Batch-class
jobs may fill only a node's `batch_slots`: the rest is kept for interactive jobs that arrive while a
large batch runs. Within those bounds the job's routing strategy picks among the nodes with room.

It runs as a thread in every router process; a Redis lock makes one of them the dispatcher at a time
(another takes over within the lock's timeout if it dies). It sleeps on the fair queue's wake list:
a job arriving or a node freeing a slot wakes it at once.

Jobs of a model that no routable node has served for settings.no_node_deadline fail as unroutable,
like a route message that found no node (tasks.routing.task).
"""

from __future__ import annotations

import logging
import threading
import time

from redis.exceptions import LockError

from tasks import metrics
from tasks.errors import TRANSIENT, ErrorKind, JobError
from tasks.jobs import lifecycle
from tasks.routing import fair_queue, registry
from tasks.routing.strategies import STRATEGIES

log = logging.getLogger(__name__)

LOCK_KEY = "switchyard:dispatcher:lock"
_LOCK_SECONDS = 5.0
_IDLE_WAIT = 0.25  # seconds asleep on the wake list before looking again anyway
_DRAIN_CHUNK = 500  # jobs of an abandoned model failed per pop


class Dispatcher:
    def __init__(self, app):
        self.app, self.settings = app, app.settings
        self._lock = app.redis.lock(LOCK_KEY, timeout=_LOCK_SECONDS, blocking=False, thread_local=False)
        self._leading_until = 0.0
        self._unserved_since: dict[str, float] = {}  # model → when it was first seen with no routable node

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if not self._lead():
                    stop.wait(1.0)
                    continue
                if not self.dispatch():
                    self.app.redis.blpop([fair_queue.WAKE_KEY], timeout=_IDLE_WAIT)
            except TRANSIENT:
                log.exception("dispatcher: Redis or Postgres unreachable; trying again in a second")
                stop.wait(1.0)
            except Exception:  # noqa: BLE001 - a bug must not end dispatching for good
                log.exception("dispatcher failed; trying again in a second")
                stop.wait(1.0)
        if self._leading_until:
            try:
                self._lock.release()
            except LockError:
                pass

    def _lead(self) -> bool:
        """Hold (or take) the dispatcher lock, extending it at most once a second."""
        now = time.monotonic()
        if self._leading_until and now < self._leading_until - (_LOCK_SECONDS - 1.0):
            return True
        try:
            held = bool(self._lock.reacquire() if self._leading_until else self._lock.acquire())
        except LockError:
            held = False
        if held and not self._leading_until:
            log.info("this router is now the dispatcher")
        self._leading_until = now + _LOCK_SECONDS if held else 0.0
        return held

    def dispatch(self) -> int:
        """One pass over the models with jobs waiting; returns how many jobs were routed."""
        nodes = [n for n in registry.live_nodes(self.app.redis) if registry.routable(n)]
        routed = 0
        for model in sorted(fair_queue.waiting_models(self.app.redis)):
            serving = [n for n in nodes if model in n.get("models", ())]
            if serving:
                self._unserved_since.pop(model, None)
                routed += self._dispatch_model(model, serving)
            else:
                self._fail_if_abandoned(model)
        return routed

    def _dispatch_model(self, model: str, nodes: list[dict]) -> int:
        free = {n["id"]: registry.free_slots(n) for n in nodes}
        limits = {fair_queue.INTERACTIVE: sum(max(0, f) for f in free.values()),
                  fair_queue.BATCH: sum(max(0, f - registry.interactive_reserve(n)) for f, n in zip(free.values(), nodes))}
        if not limits[fair_queue.INTERACTIVE]:
            return 0
        entries = fair_queue.pop(self.app.redis, model, limits)
        chosen: list[tuple[str, int, str]] = []
        try:
            for entry in entries:
                candidates = [n for n in nodes if free[n["id"]] > 0] or nodes
                node = STRATEGIES[entry.strategy](self.app.redis, candidates, model=model,
                                                  member=registry.member(entry.job_id, entry.attempt),
                                                  key=entry.affinity_key or entry.job_id)
                free[node["id"]] -= 1
                chosen.append((entry.job_id, entry.attempt, node["id"]))
            lifecycle.route_many(self.app, chosen)
            now = time.time()
            for entry, (_, _, node_id) in zip(entries, chosen):
                metrics.routing_decision(entry.strategy, node_id, waited=now - entry.enqueued_at)
        except TRANSIENT:
            # Back in line for the next pass (a job already routed is sent again then, harmlessly).
            for job_id, attempt, node_id in chosen:
                registry.release(self.app.redis, node_id, [registry.member(job_id, attempt)])
            fair_queue.push_many(self.app.redis, [(model, entry, None) for entry in entries])
            raise
        return len(entries)

    def _fail_if_abandoned(self, model: str) -> None:
        since = self._unserved_since.setdefault(model, time.monotonic())
        waited = time.monotonic() - since
        if waited < self.settings.no_node_deadline:
            return
        everything = {klass: _DRAIN_CHUNK for klass in fair_queue.CLASSES}
        while entries := fair_queue.pop(self.app.redis, model, everything):
            for entry in entries:
                lifecycle.fail_unroutable(self.app, entry.job_id, entry.attempt, JobError(
                    ErrorKind.NO_NODE, f"no healthy worker served model {model!r} for {waited:.0f} s"))
        log.warning("dispatcher: no node served model %r for %.0f s; its waiting jobs failed", model, waited)


def dispatch_forever(app) -> threading.Event:
    """Start the dispatcher thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=Dispatcher(app).run_forever, args=(stop,), name="dispatcher", daemon=True).start()
    return stop
