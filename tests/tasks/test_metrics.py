"""tasks.metrics: the cluster-state collector over real Redis and Postgres, a Celery process serving its
own registry from the worker_init signal, the engine statistics of the SimulatedEngine, and what the
webhook task, the reconciler and the job phases record."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
import uuid
from concurrent.futures import wait
from datetime import datetime, timedelta, timezone

import pytest
import redis as redis_lib
from prometheus_client import CollectorRegistry, generate_latest

from ops.services import free_port
from tasks import metrics
from tasks.jobs import tenants
from tasks.metrics.engine import register_simulated
from tasks.metrics.exposition import ROLE_PORTS, role_port, serve
from tasks.metrics.state import StateCollector, queue_keys
from tasks.routing import fair_queue, registry
from tasks.webhooks.task import deliver
from tests.support import metric_samples, metric_value
from workers.simulated import SimulatedEngine


def _scrape(*collectors) -> dict:
    reg = CollectorRegistry()
    for collector in collectors:
        reg.register(collector)
    return metric_samples(generate_latest(reg).decode())


def _count(name: str, **labels) -> float:
    """The current value of one of this process's own metric samples."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- cluster state --------------------------------------------------------------------------------


@pytest.fixture
def state_redis(app):
    client = redis_lib.Redis.from_url(app.settings.redis_url)
    client.flushdb()
    yield client
    client.close()


def _insert_job(pool, tenant_id, status: str) -> uuid.UUID:
    job_id = uuid.uuid4()
    with pool.connection() as conn:
        conn.execute("""INSERT INTO jobs (id, tenant_id, status, model, routing_strategy, request)
                        VALUES (%s, %s, %s, 'm', 'round_robin', '{}')""", (job_id, tenant_id, status))
    return job_id


def test_state_collector_reads_queues_jobs_dead_letters_and_nodes(app, app_tenant, state_redis):
    pool = app.db
    collector = StateCollector(state_redis, pool)
    before = _scrape(collector)
    state_redis.rpush("route.round_robin", b"a", b"b")
    state_redis.rpush(queue_keys("route.round_robin")[2], b"c")  # a message at priority step 6
    state_redis.rpush("ingest", b"d")
    state_redis.hset("unacked", "tag-1", b"x")
    registry.heartbeat(state_redis, {"id": "n1", "models": ["m"], "engine": "simulated", "engine_state": "ready",
                                     "inflight": 3, "batch_capacity": 64, "ewma_job_seconds": 0.5,
                                     "engine_restarts": 2}, ttl=30)
    state_redis.rpush("node.n1", b"e", b"f", b"g")
    state_redis.sadd(registry.assigned_key("n1"), "j:1", "k:1")
    registry.heartbeat(state_redis, {"id": "n2", "models": ["m"], "engine_state": "loading"}, ttl=30)
    registry.set_drain(state_redis, "n2", True)
    for i, (tenant, priority) in enumerate([("t1", "interactive"), ("t1", "interactive"), ("t2", "interactive"),
                                            ("t2", "batch")]):
        fair_queue.push(state_redis, "m", fair_queue.Entry(job_id=f"j{i}", attempt=1, strategy="round_robin",
                                                           affinity_key=None, enqueued_at=time.time(), tenant=tenant,
                                                           priority=priority, cost=16))
    for status in ("queued", "queued", "routed", "running", "succeeded"):
        dead = _insert_job(pool, app_tenant.id, status)
    with pool.connection() as conn:
        conn.execute("""INSERT INTO dead_letters (id, job_id, tenant_id, reason, attempts)
                        VALUES (%s, %s, %s, 'worker_lost', 3)""", (uuid.uuid4(), dead, app_tenant.id))

    after = _scrape(collector)
    grew = {s: metric_value(after, "switchyard_jobs", status=s) - metric_value(before, "switchyard_jobs", status=s)
            for s in ("queued", "routed", "running")}
    assert grew == {"queued": 2, "routed": 1, "running": 1}
    assert ("switchyard_jobs", frozenset({"status": "succeeded"}.items())) not in after  # active statuses only
    assert metric_value(after, "switchyard_dead_letters") - metric_value(before, "switchyard_dead_letters") == 1
    assert metric_value(after, "switchyard_queue_depth", queue="route.round_robin") == 3
    assert metric_value(after, "switchyard_queue_depth", queue="ingest") == 1
    assert metric_value(after, "switchyard_queue_depth", queue="node.n1") == 3
    assert ("switchyard_queue_depth", frozenset({"queue": "node.n2"}.items())) in after
    assert metric_value(after, "switchyard_queue_unacked") == 1
    assert metric_value(after, "switchyard_fair_queue_depth", model="m", priority="interactive") == 3
    assert metric_value(after, "switchyard_fair_queue_depth", model="m", priority="batch") == 1
    assert metric_value(after, "switchyard_fair_queue_tenants", model="m", priority="interactive") == 2
    n1 = {name: metric_value(after, name, node="n1") for name in (
        "switchyard_node_up", "switchyard_node_routable", "switchyard_node_inflight", "switchyard_node_outstanding",
        "switchyard_node_batch_capacity", "switchyard_node_ewma_job_seconds", "switchyard_node_engine_restarts_total")}
    assert n1 == {"switchyard_node_up": 1, "switchyard_node_routable": 1, "switchyard_node_inflight": 3,
                  "switchyard_node_outstanding": 2, "switchyard_node_batch_capacity": 64,
                  "switchyard_node_ewma_job_seconds": 0.5, "switchyard_node_engine_restarts_total": 2}
    assert metric_value(after, "switchyard_node_info", node="n1", engine="simulated", model="m") == 1
    assert metric_value(after, "switchyard_node_routable", node="n2") == 0
    assert metric_value(after, "switchyard_node_draining", node="n2") == 1
    assert metric_value(after, "switchyard_node_engine_ready", node="n2") == 0
    assert 0 <= metric_value(after, "switchyard_node_heartbeat_age_seconds", node="n1") < 30

    registry.deregister(state_redis, "n1")  # a node that left has no series
    assert ("switchyard_node_up", frozenset({"node": "n1"}.items())) not in _scrape(collector)


def test_an_unreachable_backend_is_reported_and_the_rest_still_read(app):
    dead = redis_lib.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    samples = _scrape(StateCollector(dead, app.db))
    assert metric_value(samples, "switchyard_backend_up", backend="redis") == 0
    assert metric_value(samples, "switchyard_backend_up", backend="postgres") == 1
    assert ("switchyard_jobs", frozenset({"status": "queued"}.items())) in samples
    assert not [k for k in samples if k[0] == "switchyard_queue_depth"]


# --- Celery processes -----------------------------------------------------------------------------


#: what Prometheus 2.x asks for: OpenMetrics first, with no UTF-8 names
PROMETHEUS_2_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                       "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _get(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": PROMETHEUS_2_ACCEPT})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read().decode()


def test_a_celery_worker_serves_its_registry_from_worker_init(app):
    """Building the router's Celery worker (as workers.router does) fires worker_init; the handler
    create_celery connected serves this process's registry, vLLM-style engine series and all."""
    from tasks.celery_app import create_celery

    from prometheus_client import REGISTRY

    port = free_port()
    router = create_celery(app.settings.model_copy(update={"metrics_port": port}))
    metrics.job_transition("succeeded")
    engine = register_simulated(SimulatedEngine(token_seconds=1, max_num_seqs=1, tokenizer=_Tokenizer()), "m")
    try:
        router.Worker(hostname="router@metrics-test", queues=["route.round_robin"], pool="threads", concurrency=1)
        samples = metric_samples(_get(port))  # the text parses
    finally:
        REGISTRY.unregister(engine)
    assert metric_value(samples, "switchyard_job_transitions_total", status="succeeded") >= 1
    assert ("switchyard_reconciler_actions_total", frozenset({"action": "rerouted"}.items())) in samples
    assert any(k[0].startswith("process_") for k in samples)  # the process's own, from the default registry
    # vLLM's names as registered, with their colon, whatever format the scraper prefers
    assert ("vllm:num_requests_waiting", frozenset({"model_name": "m", "engine": "0"}.items())) in samples


def test_each_process_kind_has_its_own_port_and_a_taken_port_is_skipped(app, caplog):
    settings = app.settings.model_copy(update={"metrics_port": None})
    assert {role: role_port(settings, role) for role in ROLE_PORTS} == ROLE_PORTS
    assert len(set(ROLE_PORTS.values())) == len(ROLE_PORTS)
    assert role_port(settings, "test") is None  # a worker of another kind serves nothing by default
    assert role_port(settings.model_copy(update={"metrics_port": 0}), "router") is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = settings.model_copy(update={"metrics_port": taken.getsockname()[1]})
        with caplog.at_level(logging.WARNING, logger="tasks.metrics.exposition"):
            assert serve(busy, "gpu") is None  # logged, never raised: the worker goes on
    assert "exports no metrics" in caplog.text


# --- engine statistics ----------------------------------------------------------------------------


class _Tokenizer:
    def decode(self, ids):
        return ""


def test_simulated_engine_reports_running_waiting_and_tokens_under_vllm_names():
    engine = SimulatedEngine(token_seconds=0.05, max_num_seqs=1, tokenizer=_Tokenizer())
    engine.start()
    reg = CollectorRegistry()
    register_simulated(engine, "sim-model", registry=reg)
    try:
        futures = [engine.submit(f"r{i}:1", [1, 2, 3], {"max_tokens": 4})[0] for i in range(3)]
        time.sleep(0.05)
        busy = metric_samples(generate_latest(reg).decode())
        labels = {"model_name": "sim-model", "engine": "0"}
        assert metric_value(busy, "vllm:num_requests_running", **labels) == 1
        assert metric_value(busy, "vllm:num_requests_waiting", **labels) == 2
        wait(futures, timeout=10)
        done = metric_samples(generate_latest(reg).decode())
        assert metric_value(done, "vllm:num_requests_running", **labels) == 0
        assert metric_value(done, "vllm:num_requests_waiting", **labels) == 0
        assert metric_value(done, "vllm:generation_tokens_total", **labels) == 12
        assert metric_value(done, "vllm:prompt_tokens_total", **labels) == 9
    finally:
        engine.shutdown()


# --- what the code records --------------------------------------------------------------------------


def test_job_phases_are_observed_from_the_rows_timestamps():
    t0 = datetime.now(timezone.utc)
    before = {p: _count("switchyard_job_phase_seconds_count", phase=p) for p in ("routed", "total")}
    sums = {p: _count("switchyard_job_phase_seconds_sum", phase=p) for p in ("routed", "total")}
    metrics.job_started({"routed_at": t0, "started_at": t0 + timedelta(seconds=2)})
    metrics.job_started({"id": "a row without timestamps"})  # nothing to observe: nothing observed
    metrics.job_finished({"created_at": t0}, t0 + timedelta(seconds=7))
    assert _count("switchyard_job_phase_seconds_count", phase="routed") - before["routed"] == 1
    assert _count("switchyard_job_phase_seconds_sum", phase="routed") - sums["routed"] == pytest.approx(2)
    assert _count("switchyard_job_phase_seconds_sum", phase="total") - sums["total"] == pytest.approx(7)


def test_reconciler_sweeps_count_each_action_and_name_undescribed_ones(caplog):
    before = _count("switchyard_reconciler_actions_total", action="rerouted")
    sweeps = _count("switchyard_reconciler_sweep_duration_seconds_count")
    metrics.reconciler_sweep({"rerouted": 2, "resent": 0, "purged": 5}, 0.01)
    assert _count("switchyard_reconciler_actions_total", action="rerouted") - before == 2
    assert _count("switchyard_reconciler_sweep_duration_seconds_count") - sweeps == 1
    with caplog.at_level(logging.WARNING, logger="tasks.metrics"):
        metrics.reconciler_sweep({"brand_new": 1}, 0.01)  # counted, and named in the log
    assert _count("switchyard_reconciler_actions_total", action="brand_new") == 1
    assert "'brand_new' is not described" in caplog.text


@pytest.fixture
def delivery(app, receiver):
    """Make a webhook delivery row the way production does: a job's status change fires the trigger."""
    tenant_id = tenants.create_tenant(app.db, f"hooks-{uuid.uuid4().hex[:6]}")[0].id

    def make(path: str) -> str:
        job_id = uuid.uuid4()
        hook = {"url": receiver.url(path), "events": ["job.succeeded"]}
        with app.db.connection() as conn:
            conn.execute("""INSERT INTO jobs (id, tenant_id, status, model, routing_strategy, request, webhook)
                            VALUES (%s, %s, 'running', 'm', 'round_robin', '{}', %s)""",
                         (job_id, tenant_id, json.dumps(hook)))
            conn.execute("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (job_id,))
            return str(conn.execute("SELECT id FROM webhook_deliveries WHERE job_id = %s", (job_id,)).fetchone()["id"])

    return make


def test_webhook_attempts_are_counted_by_outcome_with_their_latency(app, receiver, delivery):
    settings = app.settings.model_copy(update={"webhook_allow": (f"127.0.0.1:{receiver.port}",),
                                               "webhook_retry_schedule": (0.01,)})  # 2 attempts in all
    receiver.script("/hook-fails", (500, {}), (500, {}))
    outcomes = ("delivered", "failed", "dead")
    before = {o: _count("switchyard_webhook_attempts_total", outcome=o) for o in outcomes}
    timed = _count("switchyard_webhook_attempt_duration_seconds_count")
    ok, failing = delivery("/hook-ok"), delivery("/hook-fails")
    assert deliver(app.db, settings, ok, 1) == "delivered"
    assert deliver(app.db, settings, failing, 1) == "pending"
    time.sleep(0.05)
    assert deliver(app.db, settings, failing, 2) == "dead"
    assert deliver(app.db, settings, failing, 2) == "stale"  # a duplicate message is no attempt
    grew = {o: _count("switchyard_webhook_attempts_total", outcome=o) - before[o] for o in outcomes}
    assert grew == {"delivered": 1, "failed": 1, "dead": 1}
    assert _count("switchyard_webhook_attempt_duration_seconds_count") - timed == 3
