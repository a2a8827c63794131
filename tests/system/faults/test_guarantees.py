"""Delivery guarantees under faults, on real processes over real Redis and Postgres: every job is
accounted for. The SimulatedEngine stands in for vLLM (volume); the real-engine case is in
tests/system/engine/test_failover_real.py.

Each test prints its counts: submitted, succeeded, lost, results accepted, results discarded
(duplicates: work done twice whose second result was fenced off), and the time to recover."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tasks.jobs import dead_letters, lifecycle, store, tenants
from tasks.jobs.lifecycle import publish
from tasks.names import route_queue
from tasks.routing import registry


def report(name: str, cluster, ids: list[str], rows: list[dict], **extra) -> Counter:
    statuses = Counter(r["status"] for r in rows)
    outcomes = cluster.attempt_outcomes(ids)
    print(f"{name}: submitted {len(ids)}, succeeded {statuses['succeeded']}, lost {len(ids) - len(rows)}, "
          f"other {dict(statuses - Counter(succeeded=statuses['succeeded']))}, results accepted "
          f"{outcomes['succeeded']}, discarded duplicates {outcomes['discarded']}, retried attempts "
          f"{outcomes['retried']}" + "".join(f", {k} {v}" for k, v in extra.items()))
    return outcomes


def two_nodes(make_cluster, **settings):
    cluster = make_cluster(max_num_seqs=16, **settings)
    for node in ("node-a", "node-b"):
        cluster.start_worker(node, token_seconds=0.005)
    cluster.start_router()
    cluster.wait_nodes(["node-a", "node-b"])
    return cluster


def on_node(cluster, node: str, status: tuple[str, ...]) -> set[str]:
    with cluster.db.connection() as conn:
        return {str(r["id"]) for r in conn.execute(
            "SELECT id FROM jobs WHERE node_id = %s AND status = ANY(%s)", (node, list(status))).fetchall()}


def test_sigkill_one_of_two_workers_mid_batch_with_500_jobs(make_cluster):
    cluster = two_nodes(make_cluster)
    ids = cluster.submit(cluster.tenant.id, 500, strategy="least_connections", max_tokens=100)
    while len(on_node(cluster, "node-b", ("running",))) < 16:  # mid-batch: generating
        time.sleep(0.05)
    killed_at = time.time()
    cluster.signal("node-b", signal.SIGKILL)
    rows = cluster.wait_terminal(ids, timeout=240)
    recovered = max(r["finished_at"].timestamp() for r in rows) - killed_at
    outcomes = report("SIGKILL mid-batch", cluster, ids, rows, recover_s=f"{recovered:.1f}")
    assert Counter(r["status"] for r in rows) == {"succeeded": 500}
    assert outcomes["succeeded"] == 500  # exactly 500 results


def test_sigterm_lets_in_flight_jobs_finish_and_hands_the_backlog_to_the_other_node(make_cluster):
    """The dispatcher gives a node only as many jobs as it has slots (max_num_seqs + batch_size); the
    rest of the backlog waits in the fair queue. On SIGTERM, node-b finishes what it holds on the first
    attempt and announces it is draining at once, so everything still waiting goes to node-a."""
    cluster = two_nodes(make_cluster)
    ids = cluster.submit(cluster.tenant.id, 400, strategy="round_robin", max_tokens=200)  # 1 s each
    while len(on_node(cluster, "node-b", ("running",))) < 16:
        time.sleep(0.05)
    running = on_node(cluster, "node-b", ("running",))
    cluster.signal("node-b", signal.SIGTERM, group=False)
    sigterm_at = time.time()
    while not any(n["id"] == "node-b" and n["draining"] for n in registry.live_nodes(cluster.redis)):
        assert time.time() - sigterm_at < 5, "node-b should announce it is draining at once"
        time.sleep(0.02)
    draining_after = time.time() - sigterm_at
    time.sleep(0.5)  # a dispatch pass that read node-b's slots before the announcement has ended by now
    held = on_node(cluster, "node-b", ("routed", "running"))
    given_b = on_node(cluster, "node-b", ("routed", "running", "succeeded"))  # all node-b got so far
    with cluster.db.connection() as conn:
        waiting = {str(r["id"]) for r in conn.execute(
            "SELECT id FROM jobs WHERE id = ANY(%s) AND status = 'queued'", (ids,)).fetchall()}
    exit_code = cluster.wait_exit("node-b", timeout=120)
    rows = cluster.wait_terminal(ids, timeout=240)
    by_id = {str(r["id"]): r for r in rows}
    outcomes = report("SIGTERM with a backlog", cluster, ids, rows, running_at_sigterm=len(running),
                      held_while_draining=len(held), waiting_in_fair_queue=len(waiting),
                      draining_announced_s=f"{draining_after:.2f}")
    assert exit_code == 0
    assert Counter(r["status"] for r in rows) == {"succeeded": 400} and outcomes["succeeded"] == 400
    # What was generating finished where it was, on its first attempt.
    assert all(by_id[i]["node_id"] == "node-b" and by_id[i]["attempt"] == 1 for i in running)
    # node-b ran nothing it did not already hold once it was draining ...
    ran_on_b = {i for i, r in by_id.items() if r["node_id"] == "node-b"}
    assert ran_on_b <= given_b, f"{len(ran_on_b - given_b)} job(s) reached node-b after it announced draining"
    # ... and the backlog went to node-a: the fair queue's waiting jobs, and any message node-b held but
    # had not started (Celery puts it back on node-b's queue; the reconciler re-routes it once node-b left).
    assert len(waiting) > 100, "most of the 400 jobs should still be waiting when node-b is stopped"
    assert all(by_id[i]["node_id"] == "node-a" for i in waiting)
    moved = {i for i in held - running if by_id[i]["node_id"] == "node-a"}
    print(f"SIGTERM: draining announced after {draining_after:.2f} s; {len(waiting)} waiting jobs ran on node-a; "
          f"of {len(held - running)} held but not generating, {len(moved)} moved to node-a")
    assert cluster.redis.hlen("unacked") == 0  # nothing left unacknowledged in the broker


def _api_cluster(make_cluster, **kw):
    cluster = two_nodes(make_cluster, **kw)
    cluster.start_api()
    cluster.wait_api()
    key = tenants.create_tenant(cluster.db, "api-tenant")[1]
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    return cluster, http


def _submit_through_outage(cluster, http, outage, n: int = 120) -> tuple[list[str], list[requests.Response]]:
    """POST n jobs at a steady pace while `outage()` runs in the background; returns accepted ids and the
    responses refused meanwhile."""
    accepted, refused = [], []
    worker = threading.Thread(target=outage)
    for i in range(n):
        if i == n // 3:
            worker.start()
        response = http.post(f"{cluster.api}/v1/jobs", json={"prompt": f"job {i}", "max_tokens": 50}, timeout=30)
        if response.status_code == 202:
            accepted.append(response.json()["id"])
        else:
            refused.append(response)
        time.sleep(0.05)
    worker.join()
    return accepted, refused


def _check_refusals(refused: list[requests.Response]) -> None:
    assert refused, "the outage should have refused some submissions"
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] and response.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize("service", ["redis", "postgres"])
def test_backing_service_restart_mid_run(make_cluster, service):
    cluster, http = _api_cluster(make_cluster, own_postgres=service == "postgres")
    server = cluster.valkey if service == "redis" else cluster.postgres
    down: dict[str, float] = {}

    def outage():
        server.stop()
        down["at"] = time.time()
        time.sleep(8)  # longer than the API's 5 s wait for a Postgres connection
        server.start()
        down["back"] = time.time()

    accepted, refused = _submit_through_outage(cluster, http, outage)
    rows = cluster.wait_terminal(accepted, timeout=240)
    recovered = max(r["finished_at"].timestamp() for r in rows) - down["back"]
    report(f"{service} restart", cluster, accepted, rows, refused_503=len(refused), recover_s=f"{recovered:.1f}")
    _check_refusals(refused)
    assert Counter(r["status"] for r in rows) == {"succeeded": len(accepted)}
    with cluster.db.connection() as conn:  # a refused submission left nothing behind
        assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone()["n"] == len(accepted)


def test_poison_job_goes_dead_and_spares_the_rest(make_cluster):
    # Jobs that ran beside the poison when it struck are charged an attempt too; the back-off's jitter
    # spreads them out, and a job that was running in two crashes runs alone (workers/node.py), so
    # the poison's last crash takes nothing else with it.
    cluster = make_cluster(sim_crash_marker="POISON")
    nodes = ["node-a", "node-b"]
    for node in nodes:
        cluster.start_worker(node)
    cluster.start_router()
    cluster.wait_nodes(nodes)

    stop, deaths = threading.Event(), Counter()

    def supervise():  # restarts dead workers, as systemd or Kubernetes would
        while not stop.wait(0.2):
            for node in nodes:
                if cluster.procs[node].poll() is not None:
                    deaths[node] += 1
                    cluster.start_worker(node)

    supervisor = threading.Thread(target=supervise)
    supervisor.start()
    try:
        [poison] = cluster.submit(cluster.tenant.id, 1, prompt="POISON pill", max_attempts=3)
        others = cluster.submit(cluster.tenant.id, 100, max_tokens=50)
        rows = cluster.wait_terminal([poison, *others], timeout=180)
    finally:
        stop.set()
        supervisor.join()
    by_id = {str(r["id"]): r for r in rows}
    report("poison job", cluster, others, [by_id[i] for i in others], worker_deaths=sum(deaths.values()))
    dead = by_id[poison]
    assert dead["status"] == "dead" and dead["attempt"] == 3 and dead["error"]["type"] == "worker_lost"
    assert sum(deaths.values()) == 3  # it killed a worker on each of its attempts, then was retired
    assert "running it alone" in cluster.log("node-a", 200_000) + cluster.log("node-b", 200_000)
    [letter] = [d for d in dead_letters.list_dead_letters(cluster.db, cluster.tenant.id) if str(d["job_id"]) == poison]
    assert (letter["reason"], letter["attempts"]) == ("worker_lost", 3)
    assert Counter(by_id[i]["status"] for i in others) == {"succeeded": 100}, \
        [by_id[i]["error"] for i in others if by_id[i]["status"] != "succeeded"]


def test_crash_between_commit_and_publish_is_recovered(make_cluster):
    cluster = make_cluster(redispatch_after=2)
    cluster.start_worker("node-a")
    cluster.start_router()
    cluster.wait_nodes(["node-a"])
    # Exactly what a crash after the API's commit leaves: the row, and no message.
    row, _ = store.insert_job(cluster.db, tenant_id=cluster.tenant.id, model=cluster.settings.model_name,
                              strategy="round_robin", request={"prompt": "orphan", "max_tokens": 8}, metadata={},
                              max_attempts=3)
    started = time.monotonic()
    [done] = cluster.wait_terminal([str(row["id"])], timeout=60)
    print(f"commit without publish: {done['status']} after {time.monotonic() - started:.1f} s")
    assert done["status"] == "succeeded" and done["attempt"] == 1
    assert "republished" in cluster.log("router", tail=100_000)


def _route_messages(cluster, queue: str) -> list[tuple[bytes, list]]:
    """(raw message, task args) of every message waiting on a route queue (a Redis list)."""
    out = []
    for raw in cluster.redis.lrange(queue, 0, -1):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        out.append((raw, args))
    return out


def test_a_lost_retry_publish_is_recovered(make_cluster):
    """A job's retry is published while no router runs; its message is then deleted from the route
    queue (lost), and only then a router (with its reconciler) starts. The reconciler finds the job
    queued past redispatch_after and publishes it again: it finishes, exactly once, within a bound."""
    redispatch_after = 2.0
    cluster = make_cluster(redispatch_after=redispatch_after, sim_fail_marker="FLAKY", cooldown_base=0.2)
    cluster.start_worker("node-a")
    cluster.wait_nodes(["node-a"])
    # Attempt 1 routed by hand (what a router does), straight to node-a: no router exists yet. Its
    # first attempt fails with an unrecognised engine error, which is retried.
    row, _ = store.insert_job(cluster.db, tenant_id=cluster.tenant.id, model=cluster.settings.model_name,
                              strategy="round_robin", request={"prompt": "FLAKY job", "max_tokens": 8},
                              metadata={}, max_attempts=3)
    job_id = str(row["id"])
    cluster.redis.sadd(registry.assigned_key("node-a"), registry.member(job_id, 1))
    assert lifecycle.route(cluster.celery, job_id, 1, "node-a") == "node-a"

    # The retry is published to route.round_robin, where nothing consumes it ...
    queue = route_queue("round_robin")
    deadline = time.monotonic() + 30
    while not (mine := [(raw, args) for raw, args in _route_messages(cluster, queue) if args[0] == job_id]):
        assert time.monotonic() < deadline, f"no retry published: {store.get_job(cluster.db, job_id)}"
        time.sleep(0.05)
    [(raw, args)] = mine
    queued = store.get_job(cluster.db, job_id)
    assert args[1] == 2 and (queued["status"], queued["attempt"]) == ("queued", 2), (args, queued["status"])
    # ... and lost.
    assert cluster.redis.lrem(queue, 0, raw) == 1
    assert not _route_messages(cluster, queue)

    started = time.monotonic()
    cluster.start_router()
    [done] = cluster.wait_terminal([job_id], timeout=redispatch_after + 20)
    recovered_s = time.monotonic() - started
    outcomes = cluster.attempt_outcomes([job_id])
    print(f"lost retry publish: {done['status']} as attempt {done['attempt']} {recovered_s:.1f} s after a "
          f"router started (redispatch_after {redispatch_after:.0f} s); attempt log {dict(outcomes)}")
    assert (done["status"], done["attempt"]) == ("succeeded", 2)
    assert outcomes == {"retried": 1, "succeeded": 1}  # finished exactly once
    assert "republished" in cluster.log("router", tail=100_000)
    # The router's start-up (a few seconds), then at most redispatch_after + a sweep, then the job.
    assert recovered_s <= redispatch_after + 15, recovered_s


def test_duplicate_route_messages_are_harmless(make_cluster):
    cluster = make_cluster()
    cluster.start_worker("node-a")
    cluster.start_router()
    cluster.wait_nodes(["node-a"])
    ids = cluster.submit(cluster.tenant.id, 20)
    for row in [store.get_job(cluster.db, i) for i in ids]:  # every message published three times more
        for _ in range(3):
            publish(cluster.celery, row)
    rows = cluster.wait_terminal(ids)
    outcomes = report("duplicate messages", cluster, ids, rows)
    assert Counter(r["status"] for r in rows) == {"succeeded": 20} and outcomes["succeeded"] == 20


def test_fifty_concurrent_posts_with_one_idempotency_key_make_one_job(make_cluster):
    cluster, http = _api_cluster(make_cluster)
    body = {"prompt": "exactly once", "max_tokens": 8}
    headers = {"Idempotency-Key": "order-42"}

    def post(_):
        return http.post(f"{cluster.api}/v1/jobs", json=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(post, range(50)))
    codes = Counter(r.status_code for r in responses)
    job_ids = {r.json()["id"] for r in responses}
    print(f"idempotency: 50 concurrent POSTs -> status codes {dict(codes)}, {len(job_ids)} job id(s)")
    assert codes == {202: 1, 200: 49} and len(job_ids) == 1
    with cluster.db.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone()["n"] == 1
    # Same key, different body: refused with a message saying what to do.
    conflict = http.post(f"{cluster.api}/v1/jobs", json={**body, "max_tokens": 9}, headers=headers, timeout=30)
    assert conflict.status_code == 422 and "different request body" in conflict.json()["detail"]
