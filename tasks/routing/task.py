"""The route task: consumed from `route.<strategy>`, it picks a node and hands the job to the lifecycle."""

from __future__ import annotations

import time

from celery import shared_task

from tasks.errors import TRANSIENT, ErrorKind, JobError
from tasks.jobs import lifecycle
from tasks.names import ROUTE_TASK
from tasks.routing import registry
from tasks.routing.strategies import STRATEGIES

_NO_NODE_RETRY_SECONDS = 1.0


# A transient Redis/Postgres error is retried with back-off instead of failing (and acking) the message;
# a retry of a job this task already routed sends its node message again (lifecycle.route).
@shared_task(name=ROUTE_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None,
             autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=30, retry_jitter=True)
def route(self, job_id: str, attempt: int, model: str, strategy: str, enqueued_at: float,
          affinity_key: str | None = None) -> str | None:
    app = self.app
    nodes = [n for n in registry.live_nodes(app.redis, model) if registry.routable(n)]
    if not nodes:
        waited = time.time() - enqueued_at
        if waited < app.settings.no_node_deadline:
            if not lifecycle.wait_for_node(app, job_id, attempt):
                return None  # cancelled meanwhile, or a stale message for an older attempt
            raise self.retry(countdown=_NO_NODE_RETRY_SECONDS)
        lifecycle.fail_unroutable(app, job_id, attempt, JobError(
            ErrorKind.NO_NODE, f"no healthy worker serves model {model!r} after {waited:.0f} s"))
        return None
    node = STRATEGIES[strategy](app.redis, nodes, model=model, member=registry.member(job_id, attempt),
                                key=affinity_key or job_id)
    return lifecycle.route(app, job_id, attempt, node["id"])
