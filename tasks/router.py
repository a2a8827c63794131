"""The route task: consumed from `route.<strategy>`, forwards a job to its chosen node's queue."""

from __future__ import annotations

import time

import psycopg
import redis
from celery import shared_task

from tasks import notify, registry, store
from tasks.celery_app import GENERATE_TASK, ROUTE_TASK, route_queue
from tasks.routing import STRATEGIES

_NO_NODE_RETRY_SECONDS = 1.0


# Transient Redis/Postgres errors are retried with back-off instead of failing (and acking) the message.
@shared_task(name=ROUTE_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None,
             autoretry_for=(psycopg.OperationalError, redis.RedisError), retry_backoff=True, retry_backoff_max=30,
             retry_jitter=True)
def route(self, job_id: str, attempt: int, model: str, strategy: str, enqueued_at: float,
          affinity_key: str | None = None) -> str | None:
    app = self.app
    nodes = [n for n in registry.live_nodes(app.redis, model) if registry.routable(n)]
    if not nodes:
        waited = time.time() - enqueued_at
        if waited < app.settings.no_node_deadline:
            raise self.retry(countdown=_NO_NODE_RETRY_SECONDS)
        error = {"type": "no_node", "message": f"no healthy worker serves model {model!r} after {waited:.0f} s"}
        if store.fail_queued_job(app.db, job_id, attempt, error):
            notify.job_finished(app.redis, job_id)
        return None
    member = registry.member(job_id, attempt)
    node = STRATEGIES[strategy](app.redis, nodes, model=model, member=member, key=affinity_key or job_id)
    if store.mark_routed(app.db, job_id, attempt, node["id"]) is None:
        registry.release(app.redis, node["id"], [member])
        return None  # cancelled meanwhile, or a stale message for an older attempt
    app.send_task(GENERATE_TASK, args=[job_id, attempt], queue=registry.node_queue(node["id"]))
    return node["id"]


def publish(app, job: dict, *, countdown: float = 0.0) -> None:
    """Put a job (a row with store.DISPATCH_COLUMNS) on its strategy's queue: used by the API, on a
    retry and by the reconciler. `countdown` delays it (retry back-off)."""
    strategy = job["routing_strategy"]
    app.send_task(
        ROUTE_TASK,
        args=[str(job["id"]), job["attempt"], job["model"], strategy, time.time() + countdown],
        kwargs={"affinity_key": job.get("affinity_key")},
        queue=route_queue(strategy),
        countdown=countdown or None,
    )
