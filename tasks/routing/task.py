"""The route task: consumed from `route.<strategy>` in batches, it puts each job in line for a node.

A job whose model some routable node serves joins the fair queue (tasks.routing.fair_queue) at once;
the dispatcher (tasks.routing.dispatcher) routes it when a node has room, fairly between tenants and
interactive before batch. The task is a celery-batches task that takes up to ROUTE_BATCH messages at a
time, so route messages never pile up in first-in-first-out order behind a burst: a burst from one
tenant waits in its own line of the fair queue. A job that no routable node serves yet is sent back to
its route queue to look again a second later, until a node appears or settings.no_node_deadline passes
(then it fails as unroutable).

A message that meets a Redis or Postgres outage is sent back with a few seconds' delay; if even that
fails, the reconciler publishes the job again once it has been queued for settings.redispatch_after.
"""

from __future__ import annotations

import logging
import time

from celery import shared_task

from tasks.errors import TRANSIENT, ErrorKind, JobError
from tasks.jobs import lifecycle, tenants
from tasks.jobs.task import SettingsBatches
from tasks.names import ROUTE_TASK, route_queue
from tasks.routing import fair_queue, registry

log = logging.getLogger(__name__)

ROUTE_BATCH = 200  # route messages taken together
_ROUTE_FLUSH_SECONDS = 0.01  # a partial batch waits at most this long
_NO_NODE_RETRY_SECONDS = 1.0
_OUTAGE_RETRY_SECONDS = 5.0
_WEIGHTS_TTL = 5.0  # seconds a tenant's share weight is cached in a router process

_weights: dict[str, tuple[float, float]] = {}  # tenant id → (weight, when to look again)


def share_weight(app, tenant_id: str) -> float:
    """The tenant's weight in fair dispatch (its `share_weight` limit, else the default)."""
    cached = _weights.get(tenant_id)
    if cached is None or cached[1] < time.monotonic():
        found = tenants.share_weights(app.db, [tenant_id]) if tenant_id != fair_queue.NO_TENANT else {}
        cached = _weights[tenant_id] = (found.get(tenant_id, app.settings.tenant_share_weight),
                                        time.monotonic() + _WEIGHTS_TTL)
    return cached[0]


class RouteBatches(SettingsBatches):
    """Route batches are sized here, not by the GPU batch settings."""

    abstract = True
    flush_every = ROUTE_BATCH
    flush_interval = _ROUTE_FLUSH_SECONDS


@shared_task(name=ROUTE_TASK, base=RouteBatches, bind=True, acks_late=True, ignore_result=True)
def route(self, requests) -> int:
    app = self.app
    try:
        served = {m for n in registry.live_nodes(app.redis) if registry.routable(n) for m in n.get("models", ())}
    except TRANSIENT:
        served = set()  # every message is then looked at alone, and meets the outage itself
    ready, ready_requests = [], []
    for r in requests:
        try:
            job = _route_one(app, served, *r.args, **r.kwargs)
        except TRANSIENT as exc:
            _outage(app, [r], exc)
            continue
        if job is not None:
            ready.append(job)
            ready_requests.append(r)
    try:
        fair_queue.push_many(app.redis, ready)
    except TRANSIENT as exc:
        _outage(app, ready_requests, exc)
    return len(requests)


def _route_one(app, served: set[str], job_id: str, attempt: int, model: str, strategy: str, enqueued_at: float,
               affinity_key: str | None = None, tenant_id: str | None = None,
               priority: str = fair_queue.INTERACTIVE, cost: int = 1) -> tuple | None:
    """(model, fair-queue entry, weight) for a job some node serves; a job no node serves yet is
    handled here (sent back to wait, or failed) and None returned."""
    if model not in served:
        waited = time.time() - enqueued_at
        if waited >= app.settings.no_node_deadline:
            lifecycle.fail_unroutable(app, job_id, attempt, JobError(
                ErrorKind.NO_NODE, f"no healthy worker serves model {model!r} after {waited:.0f} s"))
        elif lifecycle.wait_for_node(app, job_id, attempt):  # else cancelled meanwhile, or a stale message
            app.send_task(ROUTE_TASK, args=[job_id, attempt, model, strategy, enqueued_at],
                          kwargs={"affinity_key": affinity_key, "tenant_id": tenant_id, "priority": priority,
                                  "cost": cost},
                          queue=route_queue(strategy), countdown=_NO_NODE_RETRY_SECONDS)
        return None
    tenant = tenant_id or fair_queue.NO_TENANT
    entry = fair_queue.Entry(job_id=job_id, attempt=attempt, strategy=strategy, affinity_key=affinity_key,
                             enqueued_at=enqueued_at, tenant=tenant, priority=priority, cost=max(1, int(cost)))
    return model, entry, share_weight(app, tenant)


def enqueue_many(app, jobs: list[dict]) -> None:
    """Put many new queued jobs (id, attempt, model, routing_strategy, affinity_key, tenant_id, priority,
    request) in line in the fair queue in one Redis round trip: what this task does for a route message,
    without a message for each (a batch's thousands of lines). A job whose model no node serves waits
    there until the dispatcher fails it, after settings.no_node_deadline. Raises on a Redis error; a job
    left out stays queued, and the reconciler publishes it once it is overdue."""
    now = time.time()
    items = []
    for job in jobs:
        tenant = str(job["tenant_id"])
        entry = fair_queue.Entry(job_id=str(job["id"]), attempt=job["attempt"], strategy=job["routing_strategy"],
                                 affinity_key=job.get("affinity_key"), enqueued_at=now, tenant=tenant,
                                 priority=job["priority"], cost=max(1, int(job["request"].get("max_tokens") or 1)))
        items.append((job["model"], entry, share_weight(app, tenant)))
    fair_queue.push_many(app.redis, items)


def _outage(app, requests, exc: Exception) -> None:
    """Send route messages back to look again in a few seconds."""
    log.warning("routing %d job(s) met an outage (%r); looking again in %.0f s", len(requests), exc,
                _OUTAGE_RETRY_SECONDS)
    for r in requests:
        try:
            app.send_task(ROUTE_TASK, args=r.args, kwargs=r.kwargs, queue=route_queue(r.args[3]),
                          countdown=_OUTAGE_RETRY_SECONDS)
        except Exception:  # noqa: BLE001 - the reconciler re-publishes a job left queued
            log.exception("job %s: could not send its route message again", r.args[0])
