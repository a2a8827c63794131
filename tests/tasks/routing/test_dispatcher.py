"""The dispatcher's passes over real Postgres and Redis, with nodes registered by hand (no worker): it
gives a node no more than its slots, keeps interactive slots free of batch work, routes more as slots
free up, takes jobs of waiting tenants in fair order, and fails the jobs of a model no node serves."""

from __future__ import annotations

import time

import pytest

from tasks.jobs import lifecycle, tenants
from tasks.routing import fair_queue, registry
from tasks.routing.dispatcher import Dispatcher
from tasks.routing.fair_queue import BATCH, INTERACTIVE, Entry

MODEL = "m"


@pytest.fixture(autouse=True)
def clean(app):
    app.redis.flushdb()
    with app.db.connection() as conn:
        conn.execute("TRUNCATE jobs CASCADE")


def node(app, node_id: str, slots: int, batch_slots: int) -> None:
    registry.heartbeat(app.redis, {"id": node_id, "models": [MODEL], "engine_state": "ready", "slots": slots,
                                   "batch_slots": batch_slots}, ttl=60)


def waiting_job(app, tenant, priority: str = INTERACTIVE) -> str:
    """A queued job in its tenant's line of the fair queue, as the route task leaves it."""
    row, _ = lifecycle.submit(app, tenant_id=tenant.id, model=MODEL, strategy="least_connections",
                              priority=priority, request={"prompt": "x", "max_tokens": 4}, metadata={},
                              max_attempts=2)
    fair_queue.push(app.redis, MODEL, Entry(job_id=str(row["id"]), attempt=1, strategy="least_connections",
                                            affinity_key=None, enqueued_at=0.0, tenant=str(tenant.id),
                                            priority=priority, cost=4), weight=1.0)
    return str(row["id"])


def statuses(app, ids) -> dict[str, tuple[str, str | None]]:
    with app.db.connection() as conn:
        rows = conn.execute("SELECT id::text, status, node_id FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
    return {r["id"]: (r["status"], r["node_id"]) for r in rows}


def test_nodes_get_jobs_up_to_their_slots_and_more_as_slots_free(app, app_tenant):
    node(app, "n1", slots=3, batch_slots=2)
    node(app, "n2", slots=3, batch_slots=2)
    ids = [waiting_job(app, app_tenant) for _ in range(10)]
    dispatcher = Dispatcher(app)
    assert dispatcher.dispatch() == 6
    routed = {i: s for i, s in statuses(app, ids).items() if s[0] == "routed"}
    assert len(routed) == 6 and sorted(n for _, n in routed.values()) == ["n1"] * 3 + ["n2"] * 3
    assert dispatcher.dispatch() == 0  # full
    done = next(i for i, s in routed.items() if s[1] == "n2")
    registry.release(app.redis, "n2", [registry.member(done, 1)])
    assert dispatcher.dispatch() == 1
    assert sum(s[0] == "routed" for s in statuses(app, ids).values()) == 7


def test_batch_work_leaves_the_interactive_slots_free(app, app_tenant):
    node(app, "n1", slots=4, batch_slots=2)
    batch = [waiting_job(app, app_tenant, BATCH) for _ in range(5)]
    dispatcher = Dispatcher(app)
    assert dispatcher.dispatch() == 2
    interactive = [waiting_job(app, app_tenant) for _ in range(3)]
    assert dispatcher.dispatch() == 2  # the two slots batch work may not take
    assert [s for s, _ in statuses(app, interactive).values()].count("routed") == 2
    assert [s for s, _ in statuses(app, batch).values()].count("routed") == 2


def test_a_quiet_tenant_goes_before_a_long_line(app, app_tenant):
    node(app, "n1", slots=1, batch_slots=1)
    dispatcher = Dispatcher(app)
    busy = [waiting_job(app, app_tenant) for _ in range(20)]
    dispatcher.dispatch()
    quiet_tenant = tenants.create_tenant(app.db, "quiet")[0]
    quiet = waiting_job(app, quiet_tenant)
    registry.release(app.redis, "n1", [registry.member(i, 1) for i in busy])  # the routed one finished
    assert dispatcher.dispatch() == 1
    assert statuses(app, [quiet])[quiet][0] == "routed"


def test_the_jobs_of_a_model_no_node_serves_fail_after_the_deadline(app, app_tenant):
    ids = [waiting_job(app, app_tenant) for _ in range(3)]
    dispatcher = Dispatcher(app)
    dispatcher.settings = app.settings.model_copy(update={"no_node_deadline": 0.01})
    dispatcher.dispatch()  # first seen without a node: the clock starts
    assert {s for s, _ in statuses(app, ids).values()} == {"queued"}
    time.sleep(0.05)
    dispatcher.dispatch()
    assert {s for s, _ in statuses(app, ids).values()} == {"failed"}
    assert fair_queue.waiting_models(app.redis) == set()
