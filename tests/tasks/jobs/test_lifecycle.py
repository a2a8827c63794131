"""The lifecycle's transitions and their tails, over real Postgres and Redis with no worker or router:
each transition's row change, the node slot it releases, the waiters it wakes and what it publishes."""

from __future__ import annotations

import base64
import json

import kombu.exceptions
import pytest

from tasks.errors import ErrorKind, JobError, QueueUnavailable
from tasks.jobs import lifecycle, notify
from tasks.names import node_queue, route_queue
from tasks.routing import registry

NODE = "node-x"


@pytest.fixture(autouse=True)
def clean(app):
    app.redis.flushdb()


def submit(app, app_tenant, **extra) -> dict:
    row, created = lifecycle.submit(app, tenant_id=app_tenant.id, model="m", strategy="round_robin",
                                    request={"prompt": "x", "max_tokens": 4}, metadata={}, max_attempts=2, **extra)
    assert created
    return row


def route_args(app) -> list[list]:
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0] for m in app.redis.lrange(route_queue("round_robin"), 0, -1)]


def node_ids(app, node=NODE) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in app.redis.lrange(node_queue(node), 0, -1)]


def status(app, job) -> tuple:
    with app.db.connection() as conn:
        row = conn.execute("SELECT status, attempt, node_id FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    return row["status"], row["attempt"], row["node_id"]


def routed(app, app_tenant) -> dict:
    job = submit(app, app_tenant)
    app.redis.sadd(registry.assigned_key(NODE), registry.member(job["id"], 1))  # as the strategy counts it
    assert lifecycle.route(app, job["id"], 1, NODE) == NODE
    return job


def test_submit_publishes_to_the_strategys_queue(app, app_tenant):
    job = submit(app, app_tenant)
    assert route_args(app) == [[str(job["id"]), 1, "m", "round_robin", pytest.approx(route_args(app)[0][4])]]


def test_a_refused_publish_leaves_nothing_behind(app, app_tenant, monkeypatch):
    def broker_down(*args, **kwargs):
        raise kombu.exceptions.OperationalError("broker away")

    monkeypatch.setattr(app, "send_task", broker_down)
    with pytest.raises(QueueUnavailable):
        lifecycle.submit(app, tenant_id=app_tenant.id, model="m", strategy="round_robin", request={"prompt": "lost"},
                         metadata={}, max_attempts=2)
    with app.db.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM jobs WHERE request->>'prompt' = 'lost'").fetchone()["n"] == 0


def test_route_sends_the_node_message_named_after_the_attempt(app, app_tenant):
    job = routed(app, app_tenant)
    assert status(app, job) == ("routed", 1, NODE)
    assert node_ids(app) == [registry.member(job["id"], 1)]


def test_routing_again_resends_to_the_node_it_was_routed_to(app, app_tenant):
    """A retried route message (its first try marked the job, then could not publish) sends the node
    message again, to the node first chosen, and gives back the slot of the node chosen this time."""
    job = routed(app, app_tenant)
    app.redis.delete(node_queue(NODE))  # the first try's publish never happened
    app.redis.sadd(registry.assigned_key("node-y"), registry.member(job["id"], 1))
    assert lifecycle.route(app, job["id"], 1, "node-y") == NODE
    assert node_ids(app) == [registry.member(job["id"], 1)]
    assert not app.redis.sismember(registry.assigned_key("node-y"), registry.member(job["id"], 1))
    assert status(app, job) == ("routed", 1, NODE)


def test_a_duplicate_route_message_keeps_the_jobs_slot(app, app_tenant):
    """The same route message twice (a redelivery) chooses the same node: the job's one slot there stays."""
    job = routed(app, app_tenant)
    assert lifecycle.route(app, job["id"], 1, NODE) == NODE
    assert app.redis.sismember(registry.assigned_key(NODE), registry.member(job["id"], 1))


def test_a_duplicate_start_keeps_the_running_jobs_slot(app, app_tenant):
    job = routed(app, app_tenant)
    assert len(lifecycle.start(app, [(str(job["id"]), 1)], NODE)) == 1
    assert lifecycle.start(app, [(str(job["id"]), 1)], NODE) == []  # a second copy of its message
    assert app.redis.sismember(registry.assigned_key(NODE), registry.member(job["id"], 1))
    lifecycle.cancel(app, job["id"], app_tenant.id)
    app.redis.sadd(registry.assigned_key(NODE), registry.member(job["id"], 1))
    assert lifecycle.start(app, [(str(job["id"]), 1)], NODE) == []  # cancelled: the slot goes
    assert not app.redis.sismember(registry.assigned_key(NODE), registry.member(job["id"], 1))


def test_a_job_waiting_for_a_node_is_not_taken_for_stalled(app, app_tenant):
    job = submit(app, app_tenant)
    with app.db.connection() as conn:
        conn.execute("UPDATE jobs SET queued_at = now() - interval '1 h' WHERE id = %s", (job["id"],))
    assert lifecycle.wait_for_node(app, job["id"], 1)
    with app.db.connection() as conn:
        assert conn.execute("SELECT queued_at > now() - interval '5 s' AS fresh FROM jobs WHERE id = %s",
                            (job["id"],)).fetchone()["fresh"]
    assert not lifecycle.wait_for_node(app, job["id"], 2)  # a stale message: drop it


def test_a_stale_route_changes_nothing(app, app_tenant):
    job = submit(app, app_tenant)
    assert lifecycle.route(app, job["id"], 7, NODE) is None
    assert status(app, job) == ("queued", 1, None) and node_ids(app) == []


def test_finish_releases_the_slot_and_wakes_waiters(app, app_tenant):
    job = routed(app, app_tenant)
    [started] = lifecycle.start(app, [(str(job["id"]), 1)], NODE)
    pubsub = app.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(notify.FINISHED_CHANNEL)
    pubsub.get_message(timeout=1)
    assert lifecycle.finish(app, started, NODE, result={"text": "ok"})
    assert pubsub.get_message(timeout=2)["data"].decode() == str(job["id"])
    assert status(app, job) == ("succeeded", 1, NODE)
    assert app.redis.scard(registry.assigned_key(NODE)) == 0


def test_a_superseded_attempts_result_is_discarded(app, app_tenant):
    job = routed(app, app_tenant)
    [started] = lifecycle.start(app, [(str(job["id"]), 1)], NODE)
    lifecycle.requeue_lost(app, {**started, "node_id": NODE, "status": "running"},
                           JobError(ErrorKind.WORKER_LOST, "gone"))
    assert not lifecycle.finish(app, started, NODE, result={"text": "late"})
    assert status(app, job) == ("queued", 2, None)


def test_retry_requeues_then_dead_letters(app, app_tenant):
    job = routed(app, app_tenant)
    [started] = lifecycle.start(app, [(str(job["id"]), 1)], NODE)
    assert lifecycle.retry(app, started, NODE, JobError(ErrorKind.ENGINE_DEAD, "boom")) == "queued"
    assert sorted(a[1] for a in route_args(app) if a[0] == str(job["id"])) == [1, 2]  # the retry is published
    assert lifecycle.route(app, job["id"], 2, NODE) == NODE
    [second] = lifecycle.start(app, [(str(job["id"]), 2)], NODE)
    assert lifecycle.retry(app, second, NODE, JobError(ErrorKind.ENGINE_DEAD, "boom")) == "dead"  # max_attempts 2
    assert status(app, job)[0] == "dead"
    with app.db.connection() as conn:
        [letter] = conn.execute("SELECT * FROM dead_letters WHERE job_id = %s", (job["id"],)).fetchall()
    assert letter["reason"] == "engine_dead"
    replayed = lifecycle.replay(app, letter["id"])
    assert replayed["attempt"] == 3 and status(app, job) == ("queued", 3, None)


def test_a_job_waiting_on_a_lost_node_moves_free_of_charge(app, app_tenant):
    job = routed(app, app_tenant)
    assert lifecycle.requeue_lost(app, {**job, "node_id": NODE, "status": "routed"},
                                  JobError(ErrorKind.WORKER_LOST, "gone")) == "queued"
    with app.db.connection() as conn:
        row = conn.execute("SELECT attempt, max_attempts FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert (row["attempt"], row["max_attempts"]) == (2, 3)  # a new fence, and one more attempt to match


def test_cancel_tells_the_node_and_the_waiters(app, app_tenant):
    job = routed(app, app_tenant)
    pubsub = app.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(notify.CANCEL_CHANNEL, notify.FINISHED_CHANNEL)
    pubsub.get_message(timeout=1)
    pubsub.get_message(timeout=1)
    assert lifecycle.cancel(app, job["id"], app_tenant.id)["status"] == "cancelled"
    heard = {pubsub.get_message(timeout=2)["channel"].decode() for _ in range(2)}
    assert heard == {notify.CANCEL_CHANNEL, notify.FINISHED_CHANNEL}
    assert lifecycle.cancel(app, job["id"], app_tenant.id) is None
    assert lifecycle.start(app, [(str(job["id"]), 1)], NODE) == []  # a cancelled job never starts


def test_a_cached_answer_serves_the_same_deterministic_request_of_the_same_tenant_only(app, app_tenant):
    from tasks.jobs import tenants

    request = {"prompt": "What is 2 + 2?", "max_tokens": 8, "temperature": 0, "top_p": 1.0, "cache": True}

    def submit_cached(tenant_id, **changes):
        row, created = lifecycle.submit(app, tenant_id=tenant_id, model="m", strategy="round_robin",
                                        request={**request, **changes}, metadata={}, max_attempts=2)
        assert created
        return row

    first = submit_cached(app_tenant.id)
    assert first["status"] == "queued" and len(route_args(app)) == 1  # a miss runs
    app.redis.sadd(registry.assigned_key(NODE), registry.member(first["id"], 1))
    lifecycle.route(app, first["id"], 1, NODE)
    [started] = lifecycle.start(app, [(str(first["id"]), 1)], NODE)
    answer = {"text": " 4", "finish_reason": "stop", "usage": {"prompt_tokens": 6, "completion_tokens": 1}}
    assert lifecycle.finish(app, started, NODE, result=answer)

    hit = submit_cached(app_tenant.id)
    assert hit["status"] == "succeeded" and hit["finished_at"] is not None and hit["node_id"] is None
    assert hit["result"] == {**answer, "cached": {"job_id": str(first["id"])}}
    assert len(route_args(app)) == 1  # nothing published for the hit
    for other in (submit_cached(app_tenant.id, max_tokens=9), submit_cached(app_tenant.id, prompt="What is 3 + 3?"),
                  submit_cached(tenants.create_tenant(app.db, "someone-else")[0].id)):
        assert other["status"] == "queued" and other["result"] is None
