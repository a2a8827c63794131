"""Cluster state, read from Redis and Postgres when Prometheus scrapes: queue depths, active jobs by
status, dead letters, pending webhook deliveries and the node registry.

These are facts about the cluster, not about a process, so exactly one collector reports them: the
API's `/metrics` (tasks.metrics.exposition) registers a StateCollector; no other process does, so no
query ever sums one fact over processes. A backend that does not answer leaves its series out and
sets `switchyard_backend_up{backend}` to 0; the scrape itself still succeeds.
"""

from __future__ import annotations

import logging
import time

from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tasks.jobs.status import ACTIVE_VALUES
from tasks.names import INGEST_QUEUE, WEBHOOKS_QUEUE, node_queue, route_queue
from tasks.routing import fair_queue, registry
from tasks.routing.strategies import NAMES as STRATEGIES

log = logging.getLogger(__name__)

#: per-node gauges from the registry: metric suffix → (help, value of a live node's record)
NODE_GAUGES = {
    "up": ("1 for each node whose heartbeat is live (a node whose heartbeat expired has no series).",
           lambda n, now: 1),
    "routable": ("1 while the node is in rotation: engine ready, not drained, not cooling down.",
                 lambda n, now: int(registry.routable(n))),
    "engine_ready": ("1 while the node's engine probe says ready.", lambda n, now: int(n.get("engine_state") == "ready")),
    "draining": ("1 while the node is drained (by an operator, or leaving after SIGTERM).",
                 lambda n, now: int(bool(n["draining"]))),
    "cooldown_seconds": ("Seconds left of the node's passive-health cooldown (0: none).", lambda n, now: n["cooldown_s"]),
    "inflight": ("Jobs the node's engine is generating now.", lambda n, now: n.get("inflight") or 0),
    "outstanding": ("Jobs routed to the node and not finished (its assigned set).", lambda n, now: n["outstanding"]),
    "batch_capacity": ("Jobs the node generates at once at most (batch size × batch concurrency).",
                       lambda n, now: n.get("batch_capacity") or 0),
    "ewma_job_seconds": ("The node's EWMA of seconds per job (NaN before its first job).",
                         lambda n, now: _number(n.get("ewma_job_seconds"))),
    "ewma_token_seconds": ("The node's EWMA of seconds per output token (NaN before its first job).",
                           lambda n, now: _number(n.get("ewma_token_seconds"))),
    "heartbeat_age_seconds": ("Seconds since the node's last heartbeat.",
                              lambda n, now: max(0.0, now - n.get("heartbeat_at", now))),
}

# The collector's own reads; each is served by a partial index (migrations 0001, 0002, 0003).
_ACTIVE_JOBS = "SELECT status, count(*) AS n FROM jobs WHERE status = ANY(%s) GROUP BY status"
_OPEN_DEAD_LETTERS = "SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NULL"
_PENDING_DELIVERIES = "SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'pending'"


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps a queue in: the queue's own, and one per priority step above 0."""
    return [queue] + [f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS if step]


class StateCollector:
    """A prometheus_client collector over the cluster's Redis and Postgres (the API's own handles)."""

    def __init__(self, redis, pool):
        self.redis, self.pool = redis, pool

    def describe(self):
        return list(self._families().values())  # registering must not touch Redis or Postgres

    def collect(self):
        families = self._families()
        up = families["backend_up"]
        for backend, read in (("redis", self._read_redis), ("postgres", self._read_postgres)):
            try:
                read(families)
                up.add_metric([backend], 1)
            except Exception as exc:  # noqa: BLE001 - a scrape reports what it can read
                log.warning("metrics: %s unreachable: %r", backend, exc)
                up.add_metric([backend], 0)
        return list(families.values())

    @staticmethod
    def _families() -> dict:
        g, c = GaugeMetricFamily, CounterMetricFamily
        families = {
            "backend_up": g("switchyard_backend_up", "1 when the metrics scrape could read the backend.",
                            labels=["backend"]),
            "queue_depth": g("switchyard_queue_depth",
                             "Messages waiting in a broker queue (route.<strategy>, node.<id> of each live node, "
                             "webhooks, ingest).", labels=["queue"]),
            "fair_queue": g("switchyard_fair_queue_depth",
                            "Jobs waiting in the fair queue for a node with room, by model and priority class.",
                            labels=["model", "priority"]),
            "fair_tenants": g("switchyard_fair_queue_tenants",
                              "Tenants with jobs waiting in the fair queue, by model and priority class.",
                              labels=["model", "priority"]),
            "unacked": g("switchyard_queue_unacked",
                         "Messages delivered to a consumer and not yet acknowledged, all queues together."),
            "jobs": g("switchyard_jobs", "Jobs now in each active status (queued, routed, running).", labels=["status"]),
            "dead_letters": g("switchyard_dead_letters", "Dead-lettered jobs not replayed (GET /v1/dead-letters)."),
            "webhooks_pending": g("switchyard_webhook_deliveries_pending",
                                  "Webhook deliveries waiting for their next attempt."),
            "node_info": g("switchyard_node_info", "1 per live node and model it serves, with its engine kind.",
                           labels=["node", "engine", "model"]),
            "node_engine_restarts": c("switchyard_node_engine_restarts",
                                      "Times the node's worker rebuilt a dead engine (since the worker started).",
                                      labels=["node"]),
        }
        for suffix, (help_text, _) in NODE_GAUGES.items():
            families[f"node_{suffix}"] = g(f"switchyard_node_{suffix}", help_text, labels=["node"])
        return families

    def _read_redis(self, families: dict) -> None:
        nodes = registry.live_nodes(self.redis)
        queues = [route_queue(s) for s in STRATEGIES] + [node_queue(n["id"]) for n in nodes] + \
                 [WEBHOOKS_QUEUE, INGEST_QUEUE]
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                for key in queue_keys(queue):
                    pipe.llen(key)
            pipe.hlen(Channel.unacked_key)
            lengths = pipe.execute()
        steps = len(PRIORITY_STEPS)
        for i, queue in enumerate(queues):
            families["queue_depth"].add_metric([queue], sum(lengths[i * steps:(i + 1) * steps]))
        families["unacked"].add_metric([], lengths[-1])
        for model in sorted(fair_queue.waiting_models(self.redis)):
            for klass, tenants in fair_queue.depth(self.redis, model).items():
                families["fair_queue"].add_metric([model, klass], sum(tenants.values()))
                families["fair_tenants"].add_metric([model, klass], len(tenants))
        now = time.time()
        for node in nodes:
            for suffix, (_, value) in NODE_GAUGES.items():
                families[f"node_{suffix}"].add_metric([node["id"]], value(node, now))
            families["node_engine_restarts"].add_metric([node["id"]], node.get("engine_restarts") or 0)
            for model in node.get("models", ()):
                families["node_info"].add_metric([node["id"], str(node.get("engine", "")), model], 1)

    def _read_postgres(self, families: dict) -> None:
        with self.pool.connection() as conn:
            counts = {r["status"]: r["n"] for r in conn.execute(_ACTIVE_JOBS, (ACTIVE_VALUES,))}
            dead = conn.execute(_OPEN_DEAD_LETTERS).fetchone()["n"]
            pending = conn.execute(_PENDING_DELIVERIES).fetchone()["n"]
        for status in ACTIVE_VALUES:
            families["jobs"].add_metric([status], counts.get(status, 0))
        families["dead_letters"].add_metric([], dead)
        families["webhooks_pending"].add_metric([], pending)
