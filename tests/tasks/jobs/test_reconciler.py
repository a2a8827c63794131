"""The reconciler's sweeps, one at a time, over real Postgres and Redis with no worker or router running:
each test strands a job the way a fault would and checks one sweep puts it back on the happy path."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from tasks.errors import ErrorKind, JobError
from tasks.jobs import lifecycle
from tasks.jobs.reconciler import SWEEPS_KEY, Reconciler
from tasks.names import node_queue, route_queue
from tasks.routing import registry

NODE = "live-node"


@pytest.fixture(autouse=True)
def clean(app):
    app.redis.flushdb()
    with app.db.connection() as conn:
        conn.execute("TRUNCATE jobs CASCADE")
    registry.heartbeat(app.redis, {"id": NODE, "models": ["m"], "engine_state": "ready"}, ttl=60)


def submit(app, app_tenant) -> dict:
    row, _ = lifecycle.submit(app, tenant_id=app_tenant.id, model="m", strategy="round_robin",
                              request={"prompt": "x", "max_tokens": 4}, metadata={}, max_attempts=3)
    app.redis.delete(route_queue("round_robin"))  # as if a router had taken the message
    return row


def routed(app, app_tenant, node: str, *, seconds_ago: float = 0.0, send: bool = True) -> dict:
    job = submit(app, app_tenant)
    assert lifecycle.route(app, job["id"], 1, node) == node
    if not send:
        app.redis.lpop(node_queue(node))  # the message just sent (kombu pushes on the left) is lost
    with app.db.connection() as conn:
        conn.execute("UPDATE jobs SET routed_at = now() - make_interval(secs => %s) WHERE id = %s",
                     (seconds_ago, job["id"]))
    return job


def row(app, job) -> dict:
    with app.db.connection() as conn:
        return conn.execute("SELECT * FROM jobs WHERE id = %s", (job["id"],)).fetchone()


def messages(app, queue: str) -> list[dict]:
    return [json.loads(m) for m in app.redis.lrange(queue, 0, -1)]


def test_a_job_on_a_dead_node_is_requeued_and_routed_again(app, app_tenant):
    job = routed(app, app_tenant, "dead-node")
    counts = Reconciler(app).sweep()
    assert counts["rerouted"] == 1
    after = row(app, job)
    assert (after["status"], after["attempt"], after["node_id"]) == ("queued", 2, None)
    [message] = messages(app, route_queue("round_robin"))
    assert json.loads(base64.b64decode(message["body"]))[0][:2] == [str(job["id"]), 2]
    # Its queue is kept, to expire unless the node comes back, instead of being deleted under a router.
    assert app.redis.ttl(node_queue("dead-node")) > 0


def test_a_node_that_comes_back_keeps_its_queue(app, app_tenant):
    routed(app, app_tenant, "flaky-node")
    Reconciler(app).sweep()
    assert app.redis.ttl(node_queue("flaky-node")) > 0
    registry.heartbeat(app.redis, {"id": "flaky-node", "models": ["m"]}, ttl=60)
    assert app.redis.ttl(node_queue("flaky-node")) == -1  # persistent again; its messages stay
    assert app.redis.llen(node_queue("flaky-node")) == 1


def test_a_routed_job_whose_message_is_lost_is_sent_again(app, app_tenant):
    lost = routed(app, app_tenant, NODE, seconds_ago=5, send=False)
    kept = routed(app, app_tenant, NODE, seconds_ago=5)
    fresh = routed(app, app_tenant, NODE, seconds_ago=0, send=False)  # not yet suspect
    counts = Reconciler(app).sweep()
    assert counts["resent"] == 1
    ids = [m["headers"]["id"] for m in messages(app, node_queue(NODE))]
    assert sorted(ids) == sorted([registry.member(lost["id"], 1), registry.member(kept["id"], 1)])
    assert row(app, fresh)["status"] == row(app, lost)["status"] == "routed"


def test_a_message_delivered_but_unacked_counts_as_present(app, app_tenant):
    job = routed(app, app_tenant, NODE, seconds_ago=5)
    [raw] = app.redis.lrange(node_queue(NODE), 0, -1)
    app.redis.delete(node_queue(NODE))
    with app.connection_for_write() as conn:  # as the worker's prefetch leaves it: in the unacked hash
        app.redis.hset(conn.default_channel.unacked_key, "tag-1", json.dumps([json.loads(raw), "", node_queue(NODE)]))
    assert Reconciler(app).sweep()["resent"] == 0
    assert row(app, job)["status"] == "routed"


def test_a_queued_job_without_its_message_is_published_again(app, app_tenant):
    job = submit(app, app_tenant)
    with app.db.connection() as conn:
        conn.execute("UPDATE jobs SET queued_at = now() - interval '5 s' WHERE id = %s", (job["id"],))
    assert Reconciler(app).sweep()["republished"] == 1
    assert len(messages(app, route_queue("round_robin"))) == 1


def test_a_parked_outcome_is_recorded(app, app_tenant):
    job = routed(app, app_tenant, NODE)
    [started] = lifecycle.start(app, [(str(job["id"]), 1)], NODE)
    lifecycle.park(app, started, NODE, result={"text": "kept", "finish_reason": "stop", "usage": {}})
    assert Reconciler(app).sweep()["parked"] == 1
    after = row(app, job)
    assert (after["status"], after["result"]["text"]) == ("succeeded", "kept")
    assert not app.redis.exists(lifecycle.PARKED_KEY)


def test_a_parked_retryable_failure_is_retried(app, app_tenant):
    job = routed(app, app_tenant, NODE)
    [started] = lifecycle.start(app, [(str(job["id"]), 1)], NODE)
    lifecycle.park(app, started, NODE, error=JobError(ErrorKind.ENGINE_DEAD, "boom"))
    Reconciler(app).sweep()
    after = row(app, job)
    assert (after["status"], after["attempt"]) == ("queued", 2)


def test_a_long_sweep_keeps_the_lock(app):
    """The lock is extended as a sweep goes, so a second reconciler never sweeps alongside a slow one."""
    slow, other = Reconciler(app), Reconciler(app)
    slow._lock.timeout = 0.3  # a sweep three times longer than the lock's lifetime
    inside, leaving = threading.Event(), threading.Event()

    def long_sweep():
        inside.set()
        for _ in range(10):
            time.sleep(0.1)
            slow._still_mine()
        leaving.set()
        return {}

    slow._sweep = long_sweep
    thread = threading.Thread(target=slow.sweep)
    thread.start()
    inside.wait(2)
    refused = []
    while not leaving.is_set():
        refused.append(other.sweep() == {})
        time.sleep(0.05)
    thread.join()
    assert refused and all(refused), "a second sweep ran while the first still held the lock"
    other.sweep()
    assert other.sweeps == 1  # free once the slow one is done
    spans = [tuple(map(float, s.decode().split()[1:])) for s in app.redis.lrange(SWEEPS_KEY, 0, -1)]
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans


def test_a_job_past_its_cancel_after_deadline_is_cancelled(app, app_tenant):
    late, _ = lifecycle.submit(app, tenant_id=app_tenant.id, model="m", strategy="round_robin",
                               request={"prompt": "x", "max_tokens": 4}, metadata={}, max_attempts=3, cancel_after=0.2)
    in_time, _ = lifecycle.submit(app, tenant_id=app_tenant.id, model="m", strategy="round_robin",
                                  request={"prompt": "x", "max_tokens": 4}, metadata={}, max_attempts=3,
                                  cancel_after=600)
    time.sleep(0.3)
    assert Reconciler(app).sweep()["deadline_cancelled"] == 1
    cancelled = row(app, late)
    assert cancelled["status"] == "cancelled" and "Cancel-After" in cancelled["error"]["message"]
    assert row(app, in_time)["status"] == "queued"
