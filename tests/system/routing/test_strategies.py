"""Routing strategies on real processes: routers and GPU workers over real Redis and Postgres, with the
SimulatedEngine standing in for vLLM (these tests are about routing, not generation).

Each strategy's test is a workload on which that strategy passes and every other strategy fails:
nodes of unequal speed, so that ignoring speed (round robin), ignoring load (round robin, prefix
affinity), or weighing load by speed or not (weighted response time vs least connections) shows. The
workloads take the strategy as a parameter; test_each_workload_fails_under_the_other_strategies runs
every workload under the three strategies it is not about and expects it to fail (opt in, about ten
minutes: SWITCHYARD_PROVE_DISCRIMINATION=1).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict

import pytest

from tasks.routing import registry
from tasks.routing.strategies import _CURSOR_KEY, NAMES, affinity_key, ring_order
from tests.support import in_background, run_in_threads

NODES = ["node-a", "node-b", "node-c"]


def per_node(rows) -> Counter:
    return Counter(r["node_id"] for r in rows)


def setup_holds(condition: bool, message: str) -> None:
    """A condition of the workload, not of the strategy: fails the test without an AssertionError,
    so that the discrimination test below does not count it as the strategy failing."""
    if not condition:
        pytest.fail(f"workload setup broken: {message}")


def all_succeeded(rows, n: int) -> None:
    statuses = Counter(r["status"] for r in rows)
    setup_holds(statuses == {"succeeded": n}, f"not all {n} jobs succeeded: {dict(statuses)}")


# --- round robin ------------------------------------------------------------------------------------


def round_robin_workload(make_cluster, strategy: str) -> None:
    """300 jobs at once over three nodes, one of them 4x slower, taken by two routers: exactly 100 each.

    What round robin guarantees: each routing decision takes the next value of one atomic counter
    (INCR) and picks `live routable nodes sorted by id`[value mod n]. 300 consecutive values give each
    of 3 residues exactly 100 times, wherever the counter started (so warm-up jobs would not matter)
    and however many routers and threads take the messages. That holds while
      1. every job takes exactly one counter step: a route message taken twice (a duplicate publish,
         or the reconciler publishing again a job still queued after redispatch_after) takes two, so
         redispatch_after is set far beyond this run;
      2. every decision sees the same routable set: all three nodes are routable before the first
         job is submitted, and none drains, cools down or misses its heartbeat TTL meanwhile.
    The test checks both conditions as well (the counter ends at 300, every job on its first
    attempt), so a failure says whether the strategy or the setup broke exactness.

    The slow node does not change round robin's split; it makes speed- or load-aware strategies
    give that node clearly fewer jobs, so none of them can pass by landing on 100 each.
    """
    cluster = make_cluster(redispatch_after=600)
    for node in NODES:
        cluster.start_worker(node, token_seconds=0.008 if node == "node-c" else 0.002)
    cluster.start_router("router-1")
    cluster.start_router("router-2")
    cluster.wait_nodes(NODES)
    ids = cluster.submit(cluster.tenant.id, 300, strategy=strategy)
    rows = cluster.wait_terminal(ids)
    all_succeeded(rows, 300)
    counts = per_node(rows)
    cursor = int(cluster.redis.get(_CURSOR_KEY.format(cluster.settings.model_name)) or 0)
    print(f"{strategy} on the round robin workload (300 jobs, node-c 4x slower, two routers): "
          f"{dict(counts)}; cursor {cursor}")
    assert {n: counts[n] for n in NODES} == {n: 100 for n in NODES}, counts
    attempts = Counter(r["attempt"] for r in rows)
    assert cursor == 300 and attempts == {1: 300}, (cursor, attempts)
    # Two routers ran, and one of them led the dispatching (the other stands by to take over).
    leaders = [r for r in ("router-1", "router-2") if "this router is now the dispatcher" in cluster.log(r, tail=200_000)]
    assert len(leaders) == 1, leaders


def test_round_robin_is_exact_with_two_routers(make_cluster):
    round_robin_workload(make_cluster, "round_robin")


# --- least connections ------------------------------------------------------------------------------


def _sample_counts(cluster, stop, snapshots: list[list[int]]) -> None:
    while not stop.is_set():
        with cluster.redis.pipeline(transaction=True) as pipe:  # one atomic snapshot of all three sets
            for node in NODES:
                pipe.scard(registry.assigned_key(node))
            snapshots.append(pipe.execute())
        time.sleep(0.02)


def least_connections_workload(make_cluster, strategy: str) -> None:
    """Steady arrivals over two fast nodes and one 3x slower one: the outstanding counts stay level.

    A job stays outstanding 3x longer on node-c, so a strategy that ignores load (round robin,
    prefix affinity's hashing) piles outstanding jobs up there (about 3x the others' by Little's
    law), and one that weighs load by speed (weighted response time) keeps node-c's count far below
    the others'. Only least connections keeps the counts themselves level."""
    cluster = make_cluster(batch_flush_interval=0.01)
    for node in NODES:
        cluster.start_worker(node, token_seconds=0.012 if node == "node-c" else 0.004)
    cluster.start_router()
    cluster.wait_nodes(NODES)
    cluster.wait_terminal(cluster.submit(cluster.tenant.id, 30, strategy=strategy))  # warm-up (and speeds)
    snapshots: list[list[int]] = []
    ids = []
    with in_background(lambda stop: _sample_counts(cluster, stop, snapshots)):
        next_at = time.monotonic()
        for _ in range(400):  # one job every 15 ms for 6 s, each 0.13 s of work (0.38 s on node-c)
            ids += cluster.submit(cluster.tenant.id, 1, strategy=strategy, max_tokens=32)
            next_at += 0.015
            time.sleep(max(0.0, next_at - time.monotonic()))
    rows = cluster.wait_terminal(ids)
    all_succeeded(rows, 400)
    setup_holds(len(snapshots) >= 100, f"only {len(snapshots)} snapshots of the outstanding counts")
    spreads = [max(c) - min(c) for c in snapshots]
    means = [sum(c[i] for c in snapshots) / len(snapshots) for i in range(len(NODES))]
    share = {k: sum(s <= k for s in spreads) / len(spreads) for k in (1, 2)}
    print(f"{strategy} on the least connections workload (node-c 3x slower): {len(spreads)} snapshots, mean "
          f"outstanding per node {', '.join(f'{m:.2f}' for m in means)}; instantaneous spread <= 1 in "
          f"{share[1]:.1%}, <= 2 in {share[2]:.1%}, max {max(spreads)}; jobs per node {dict(per_node(rows))}")
    # On average the nodes carry the same number of outstanding jobs, within 1. An instant can show
    # more: between a completion on one node and the next arrival the spread is briefly 2 (a strategy
    # can only answer completions, not prevent them); each decision itself keeps the counts within 1
    # (test_decisions.py::test_least_connections_decisions_are_atomic_across_routers).
    assert max(means) - min(means) <= 1.0, means
    assert share[2] >= 0.9 and max(spreads) <= 4, (share, max(spreads))


def test_least_connections_keeps_outstanding_counts_level(make_cluster):
    least_connections_workload(make_cluster, "least_connections")


# --- weighted response time -------------------------------------------------------------------------


def _wait_for_speeds(cluster, node_ids: list[str], timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        speeds = {n["id"]: n.get("ewma_job_seconds") for n in registry.live_nodes(cluster.redis)}
        if all(speeds.get(n) for n in node_ids):
            return speeds
        time.sleep(0.2)
    raise AssertionError(f"no measured speed for every node after {timeout} s: {speeds}")


def weighted_response_time_workload(make_cluster, strategy: str) -> None:
    """A burst of 120 jobs onto a fast node and one 3x slower, both with measured speeds: split ~3:1.

    The burst is routed well before its first job ends (4 s on the fast node), so the split is the
    strategies' view of an equal backlog: weighted response time equalises (outstanding + 1) x
    seconds per job, about 90:30; least connections equalises outstanding, 60:60; round robin
    alternates, 60:60; prefix affinity's bounded loads allow a node at most 1.25x the average, 75:45.
    The threshold, at least 2x as many on the fast node, lies between."""
    cluster = make_cluster()
    cluster.start_worker("fast", token_seconds=0.02)
    cluster.start_worker("slow", token_seconds=0.06)  # 3x slower
    cluster.start_router()
    cluster.wait_nodes(["fast", "slow"])
    # Setup: each node runs a few jobs (round robin, whatever the strategy under test), so that their
    # heartbeats carry a measured speed.
    cluster.wait_terminal(cluster.submit(cluster.tenant.id, 6, strategy="round_robin", max_tokens=20))
    speeds = _wait_for_speeds(cluster, ["fast", "slow"])
    ids = cluster.submit(cluster.tenant.id, 120, strategy=strategy, max_tokens=200)
    rows = cluster.wait_terminal(ids)
    all_succeeded(rows, 120)
    counts = per_node(rows)
    routing_s = max(r["routed_at"] for r in rows) - min(r["created_at"] for r in rows)
    first_done_s = min(r["finished_at"] for r in rows) - min(r["created_at"] for r in rows)
    print(f"{strategy} on the weighted response time workload (measured s/job "
          f"{', '.join(f'{k} {v:.2f}' for k, v in sorted(speeds.items()))}): {dict(counts)}; burst routed in "
          f"{routing_s.total_seconds():.1f} s, first job done after {first_done_s.total_seconds():.1f} s")
    setup_holds(routing_s < first_done_s,
                "the burst should be routed before any of it ends (machine too slow?)")
    assert counts["fast"] >= 2 * counts["slow"], counts


def test_weighted_response_time_favours_the_faster_node(make_cluster):
    weighted_response_time_workload(make_cluster, "weighted_response_time")


# --- prefix affinity --------------------------------------------------------------------------------


def sessions_homed_evenly(tenant_id, per_node: int = 8) -> list[str]:
    """Session ids whose home (first node on the hash ring) is each node `per_node` times.

    With 3 nodes x 64 points the ring is not even: session-0..23 would have 13, 9 and 2 sessions at
    home on node-c, -b and -a, and 13 concurrent conversations exceed node-c's load bound
    (1.25 x 25 / 3, so 11), making some turns spill over as designed. Balanced homes keep the
    stickiness check about stickiness; the hot session below checks the spill-over."""
    picked: dict[str, list[str]] = {n: [] for n in NODES}
    i = 0
    while any(len(p) < per_node for p in picked.values()):
        session = f"session-{i}"
        home = ring_order(tuple(NODES), affinity_key(tenant_id, session, {}))[0]
        if len(picked[home]) < per_node:
            picked[home].append(session)
        i += 1
    return [s for n in NODES for s in picked[n]]


def prefix_affinity_workload(make_cluster, strategy: str) -> None:
    """24 conversations of 8 turns stay on their home nodes; one hot session spills over."""
    cluster = make_cluster()
    for node in NODES:
        cluster.start_worker(node)
    cluster.start_router()
    cluster.wait_nodes(NODES)

    # Each turn is sent when the previous one has its answer.
    homes: dict[str, list[str]] = defaultdict(list)

    def converse(session: str) -> None:
        for turn in range(8):
            [job_id] = cluster.submit(cluster.tenant.id, 1, strategy=strategy, session_id=session,
                                      prompt=f"turn {turn} of {session}")
            [row] = cluster.wait_terminal([job_id], timeout=60)
            setup_holds(row["status"] == "succeeded", f"{session} turn {turn}: {row['status']}")
            homes[session].append(row["node_id"])

    sessions = sessions_homed_evenly(cluster.tenant.id)
    run_in_threads([lambda s=session: converse(s) for session in sessions], timeout=300)
    assert len(homes) == 24 and all(len(nodes) == 8 for nodes in homes.values()), \
        {s: len(nodes) for s, nodes in homes.items()}
    shares = [Counter(nodes).most_common(1)[0][1] / len(nodes) for nodes in homes.values()]
    used = Counter(Counter(nodes).most_common(1)[0][0] for nodes in homes.values())
    print(f"{strategy} on the prefix affinity workload: {len(shares)} sessions x 8 turns, mean share on the "
          f"home node {sum(shares) / len(shares):.1%}, min {min(shares):.0%}, homes {dict(used)}")
    assert sum(shares) / len(shares) >= 0.95 and len(used) == 3, (shares, used)

    # One hot session floods the cluster: its home node fills to the bound, the rest spills over.
    ids = cluster.submit(cluster.tenant.id, 90, strategy=strategy, session_id="hot", max_tokens=200)
    rows = cluster.wait_terminal(ids)
    all_succeeded(rows, 90)
    spread = per_node(rows)
    print(f"{strategy}, hot session of 90 concurrent jobs: {dict(spread)}")
    assert len(spread) >= 2 and max(spread.values()) < 90


def test_prefix_affinity_keeps_sessions_on_one_node_and_spills_hot_ones(make_cluster):
    prefix_affinity_workload(make_cluster, "prefix_affinity")


# --- each workload tells its strategy from the others ----------------------------------------------

WORKLOADS = {
    "round_robin": round_robin_workload,
    "least_connections": least_connections_workload,
    "weighted_response_time": weighted_response_time_workload,
    "prefix_affinity": prefix_affinity_workload,
}
assert set(WORKLOADS) == set(NAMES)


@pytest.mark.skipif(not os.environ.get("SWITCHYARD_PROVE_DISCRIMINATION"),
                    reason="about ten minutes; set SWITCHYARD_PROVE_DISCRIMINATION=1 to run")
@pytest.mark.parametrize("workload,strategy", [(w, s) for w in WORKLOADS for s in NAMES if s != w])
def test_each_workload_fails_under_the_other_strategies(make_cluster, workload, strategy):
    with pytest.raises(AssertionError) as failure:
        WORKLOADS[workload](make_cluster, strategy)
    print(f"as it should, the {workload} workload failed under {strategy}: "
          f"{str(failure.value).splitlines()[0][:300]}")
