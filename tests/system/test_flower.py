"""Flower shows the work: real processes (a router, a GPU worker on the SimulatedEngine, a webhooks worker
and Flower itself, with a login as outside the quickstart) over the cluster's own Postgres and Valkey;
the test reads what Flower shows through its HTTP API.

celery-batches runs a batch as one call and sends no task events of its own, so without workers/batch.py
Flower lists no generation (and no route message ends) and the GPU worker has processed 0 tasks; and
Celery 5.6.3 loses task events of threads-pool workers now and then (tasks.celery_app.SafeEventDispatcher),
which left route tasks and webhook deliveries unfinished in Flower.
"""

from __future__ import annotations

import sys
import time

import pytest
import requests

from ops.services import free_port
from tasks.jobs import lifecycle
from tasks.names import DELIVER_TASK, GENERATE_TASK, ROUTE_TASK
from tasks.routing.strategies import affinity_key

NODE = "flower-gpu"
WORKER = f"gpu@{NODE}"
LOGIN = ("operator", "flower-test-password")


def flower_get(base: str, path: str, **params):
    response = requests.get(f"{base}{path}", params=params, auth=LOGIN, timeout=10)
    response.raise_for_status()
    return response.json()


def wait_for(predicate, timeout: float, what: str, show=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}; {show()}")


def submit_with_webhook(cluster, url: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        request = {"prompt": f"webhook {i}", "max_tokens": 4, "temperature": 0}
        row, _ = lifecycle.submit(cluster.celery, tenant_id=cluster.tenant.id, model=cluster.settings.model_name,
                                  strategy="round_robin", request=request, metadata={}, max_attempts=3,
                                  affinity_key=affinity_key(cluster.tenant.id, None, request),
                                  webhook={"url": url, "events": ["job.succeeded"]})
        ids.append(str(row["id"]))
    return ids


@pytest.fixture
def flower_cluster(make_cluster, receiver):
    cluster = make_cluster(sim_fail_marker="FAIL-ONCE", webhook_allow=f"127.0.0.1:{receiver.port}",
                           webhook_sweep_interval=0.2)
    cluster.start_worker(NODE)
    cluster.start_router()
    cluster.start("webhooks", [sys.executable, "-m", "workers.webhook_worker"], SWITCHYARD_NODE_ID="flower-hooks")
    cluster.flower = f"http://127.0.0.1:{free_port()}"
    cluster.start("flower", [sys.executable, "-m", "celery", "-A", "tasks.app", "flower",
                             f"--port={cluster.flower.rsplit(':', 1)[1]}", "--address=127.0.0.1"],
                  FLOWER_BASIC_AUTH=":".join(LOGIN))
    cluster.wait_nodes([NODE])

    def flower_sees_the_workers() -> bool:
        # A worker is on Flower's Workers page once Flower took one of its events (heartbeats, every
        # 2 s): from then on Flower sees every event the jobs cause.
        try:
            shown = {w["hostname"] for w in flower_get(cluster.flower, "/workers", json=1)["data"]}
        except requests.RequestException:
            return False
        return {WORKER, "router@router", "webhooks@flower-hooks"} <= shown

    cluster.wait_until(flower_sees_the_workers, 60, "Flower listing the workers", watch=["flower", NODE])
    return cluster


def test_flower_shows_each_generation_route_and_delivery(flower_cluster, receiver):
    cluster = flower_cluster
    assert requests.get(f"{cluster.flower}/api/tasks", timeout=10).status_code == 401  # a login is required
    plain = cluster.submit(cluster.tenant.id, 20, max_tokens=8)
    # fails its first attempt; long enough that its events are not published together with its task-sent
    [retried] = cluster.submit(cluster.tenant.id, 1, prompt="FAIL-ONCE", max_tokens=100)
    hooked = submit_with_webhook(cluster, f"http://127.0.0.1:{receiver.port}/flower-test", 20)
    rows = {str(r["id"]): r for r in cluster.wait_terminal([*plain, retried, *hooked], timeout=120)}
    assert {r["status"] for r in rows.values()} == {"succeeded"}, rows
    assert rows[retried]["attempt"] == 2

    def ended(name: str, at_least: int, states=("SUCCESS",)):
        """Flower's tasks of this name, once at least `at_least` are known and all are in `states`."""
        def check() -> dict | None:
            tasks = flower_get(cluster.flower, "/api/tasks", taskname=name)
            return tasks if len(tasks) >= at_least and all(t["state"] in states for t in tasks.values()) else None
        return check

    def shown(name: str):
        return lambda: {u: (t["state"], t.get("worker")) for u, t in
                        flower_get(cluster.flower, "/api/tasks", taskname=name).items()}

    # Every attempt of every job is a generate task in Flower, uuid `job id:attempt` (its message's id).
    attempts = {f"{job_id}:{row['attempt']}" for job_id, row in rows.items()} | {f"{retried}:1"}
    tasks = wait_for(ended(GENERATE_TASK, len(attempts), ("SUCCESS", "RETRY")), 30,
                     f"Flower showing the {len(attempts)} generations ended", shown(GENERATE_TASK))
    assert set(tasks) == attempts
    for job_id, row in rows.items():
        task = tasks[f"{job_id}:{row['attempt']}"]
        assert task["name"] == GENERATE_TASK and task["state"] == "SUCCESS", task
        assert task["worker"] == WORKER, task
        assert task["runtime"] > 0 and task["received"] and task["started"] and task["succeeded"], task
        assert task["args"] == repr([job_id, row["attempt"]]), task
        assert task["retries"] == row["attempt"] - 1, task
        assert "completion_tokens" in task["result"], task
    first = tasks[f"{retried}:1"]
    assert first["state"] == "RETRY" and first["worker"] == WORKER and first["retries"] == 0, first
    assert first["exception"].startswith("engine"), first

    # One route message per attempt, each ended by the router; the webhook deliveries by the webhooks worker.
    routes = wait_for(ended(ROUTE_TASK, len(attempts)), 30, "Flower showing every route message ended",
                      shown(ROUTE_TASK))
    assert {t["worker"] for t in routes.values()} == {"router@router"}, routes
    assert all(t["runtime"] > 0 and t["retries"] in (0, 1) for t in routes.values()), routes
    delivered = wait_for(ended(DELIVER_TASK, len(hooked)), 30, "Flower showing every delivery ended",
                         shown(DELIVER_TASK))
    assert {t["worker"] for t in delivered.values()} == {"webhooks@flower-hooks"}, delivered
    assert all(t["runtime"] > 0 and t["result"] == "'delivered'" for t in delivered.values()), delivered

    # The Workers page counts what the GPU worker processed (its "Processed" column is task-received).
    [gpu] = [w for w in flower_get(cluster.flower, "/workers", json=1)["data"] if w["hostname"] == WORKER]
    assert gpu["task-received"] == gpu["task-started"] == len(attempts), gpu
    assert gpu["task-succeeded"] == len(rows) and gpu["task-retried"] == 1, gpu
