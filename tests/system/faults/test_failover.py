"""Failover: a node killed without warning while it holds work (SIGKILL), on real processes.

The SimulatedEngine stands in for vLLM here (this is about routing and recovery, with 300 jobs);
tests/system/engine/test_failover_real.py does the same with the real engine."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter

from tasks.routing import registry
from tasks.names import GENERATE_TASK, node_queue

NODES = ["node-a", "node-b", "node-c"]


def test_sigkill_one_of_three_nodes_with_300_jobs_in_flight(make_cluster):
    # Slots for every job: all 300 are on nodes (not waiting in the fair queue) when node-b dies.
    cluster = make_cluster(max_num_seqs=16, node_slots=300)
    for node in NODES:
        cluster.start_worker(node, token_seconds=0.01)  # 100 tokens = 1 s per job; 16 at once per node
    cluster.start_router()
    cluster.wait_nodes(NODES)

    ids = cluster.submit(cluster.tenant.id, 300, strategy="round_robin", max_tokens=100)
    while cluster.statuses(ids)["queued"]:  # kill once every job is on a node
        time.sleep(0.1)
    # Frozen first, so that what it holds cannot change between the snapshot and the kill (a batch
    # finishing in between would count as held, and as not re-routed).
    killed_at = time.time()
    cluster.signal("node-b", signal.SIGSTOP)
    with cluster.db.connection() as conn:
        held = {str(r["id"]) for r in conn.execute(
            "SELECT id FROM jobs WHERE node_id = 'node-b' AND status IN ('routed', 'running')").fetchall()}
    cluster.signal("node-b", signal.SIGKILL)
    assert len(held) >= 40, f"node-b should hold many jobs when it is killed, not {len(held)}"

    rows = cluster.wait_terminal(ids, timeout=180)
    by_id = {str(r["id"]): r for r in rows}
    outcomes = cluster.attempt_outcomes(ids)
    rerouted = [by_id[i] for i in held]
    reroute_s = [r["routed_at"].timestamp() - killed_at for r in rerouted]
    finish_s = [r["finished_at"].timestamp() - killed_at for r in rerouted]
    print(f"failover: {Counter(r['status'] for r in rows)}; node-b held {len(held)} jobs at the kill; re-routed "
          f"{min(reroute_s):.1f}..{max(reroute_s):.1f} s after it, finished by {max(finish_s):.1f} s; attempt log "
          f"{dict(outcomes)}")
    assert Counter(r["status"] for r in rows) == {"succeeded": 300}
    assert outcomes["succeeded"] == 300  # exactly one accepted result per job: no duplicates
    assert all(r["attempt"] == 2 and r["node_id"] in ("node-a", "node-c") for r in rerouted)
    assert max(reroute_s) <= 15.0
    # Their own run time on the survivors: at most 300 jobs / 32 slots × 1 s, after the re-route.
    assert max(finish_s) <= 15.0 + 300 / 32 * 1.0 + 5

    # The dead node comes back under its old name: it rejoins on its own ...
    assert cluster.wait_exit("node-b", timeout=10) == -signal.SIGKILL  # the first life is gone for good
    cluster.start_worker("node-b", token_seconds=0.01)
    cluster.wait_nodes(NODES)
    later = cluster.submit(cluster.tenant.id, 30, strategy="round_robin", max_tokens=10)
    assert Counter(r["node_id"] for r in cluster.wait_terminal(later))["node-b"] == 10
    # ... and an old message it takes (attempt 1 of a job that finished as attempt 2) changes nothing.
    # The evidence comes from the second life only: it is the node-b in the registry, it acknowledged
    # the message (gone from its queue and from the unacked list; the message has an id of its own,
    # since the first life's copies of attempt 1 still sit unacked until the visibility timeout), and
    # it logged the skip in the part of the shared log file written after the message was sent (the
    # first life was dead before that).
    second_life = cluster.procs["node-b"]
    [record] = [n for n in registry.live_nodes(cluster.redis) if n["id"] == "node-b"]
    assert record["pid"] == second_life.pid
    victim = rerouted[0]
    stale = f"replay-{uuid.uuid4()}"
    log_path = cluster.log_dir / "node-b.log"
    offset = log_path.stat().st_size
    cluster.celery.send_task(GENERATE_TASK, args=[str(victim["id"]), 1], queue=node_queue("node-b"),
                             task_id=stale)
    deadline = time.monotonic() + 30
    while True:
        since = log_path.read_bytes()[offset:].decode(errors="replace")
        held = held_messages(cluster, node_queue("node-b"))
        if "skipped 1 of 1 jobs" in since and stale not in held:
            break
        assert time.monotonic() < deadline, (
            f"the second life of node-b did not take and skip the stale message within 30 s: "
            f"{'still held' if stale in held else 'acknowledged'}; its log since:\n{since[-3000:]}")
        time.sleep(0.1)
    assert second_life.poll() is None
    [after] = cluster.wait_terminal([str(victim["id"])])
    assert (after["status"], after["attempt"], after["node_id"], after["result"], after["finished_at"]) == \
        ("succeeded", 2, victim["node_id"], victim["result"], victim["finished_at"])
    assert cluster.attempt_outcomes([str(victim["id"])])["succeeded"] == 1
    print(f"replay: node-b's second life (pid {second_life.pid}) skipped the stale message {stale}")


def held_messages(cluster, queue: str) -> set[str]:
    """Task ids of the messages waiting on `queue` or delivered from it and not yet acknowledged."""
    held = {json.loads(raw)["headers"]["id"] for raw in cluster.redis.lrange(queue, 0, -1)}
    for raw in cluster.redis.hvals("unacked"):
        payload, _exchange, routing_key = json.loads(raw)
        if routing_key == queue:
            held.add(payload["headers"]["id"])
    return held
