"""No job waits an hour: each path that used to strand a job until the visibility timeout (1 h) or the job
timeout (30 min), on real processes with the DEFAULT timing (heartbeats, reconciler, back-off,
redispatch_after), and the job finishing exactly once within 30 s of the fault.

The SimulatedEngine stands in for vLLM: these tests are about recovery, not generation.
"""

from __future__ import annotations

import signal
import time

from tasks.jobs import store
from tasks.jobs.reconciler import SWEEPS_KEY
from tasks.names import node_queue
from tasks.routing import registry

RECOVERY_S = 30.0


def job_row(cluster, job_id: str) -> dict:
    with cluster.db.connection() as conn:
        return conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def exactly_once(cluster, ids: list[str]) -> None:
    outcomes = cluster.attempt_outcomes(ids)
    assert outcomes["succeeded"] == len(ids), outcomes


def test_a_routed_job_whose_message_is_lost_is_sent_again(make_cluster):
    """(a) The route task marked the job routed, then its publish to node.<id> failed, or its router died
    between the two (or Redis lost the message): the job is routed, and no message exists. The test
    plays that router: it commits the job as the API does and marks it routed as the route task does,
    and stops there."""
    cluster = make_cluster(fast=False)
    cluster.start_worker("node-a")
    cluster.start_router()
    cluster.wait_nodes(["node-a"])
    request = {"prompt": "hello", "max_tokens": 16, "temperature": 0}
    row, _ = store.insert_job(cluster.db, tenant_id=cluster.tenant.id, model=cluster.settings.model_name,
                              strategy="round_robin", request=request, metadata={}, max_attempts=3)
    job_id = str(row["id"])
    assert store.mark_routed(cluster.db, job_id, 1, "node-a")
    lost_at = time.time()

    [row] = cluster.wait_terminal([job_id], timeout=60)
    recovered = row["finished_at"].timestamp() - lost_at
    print(f"(a) routed without a message: succeeded {recovered:.1f} s later, attempt {row['attempt']}")
    assert (row["status"], row["attempt"], row["node_id"]) == ("succeeded", 1, "node-a")
    assert recovered <= RECOVERY_S
    exactly_once(cluster, [job_id])
    assert "its message is gone; sending it again" in cluster.log("router", tail=100_000)


def test_a_node_that_only_missed_its_heartbeat_comes_back_and_loses_nothing(make_cluster):
    """(b) A node's heartbeat lapsed (here: the process was paused past the TTL), the reconciler took its
    jobs back and forgot it, and then it came back: its queue must still be there for the work routed
    to it, and every job finishes once."""
    cluster = make_cluster(fast=False, max_num_seqs=16)
    for node in ("node-a", "node-b"):
        cluster.start_worker(node, token_seconds=0.01)
    cluster.start_router()
    cluster.wait_nodes(["node-a", "node-b"])
    ids = cluster.submit(cluster.tenant.id, 60, max_tokens=100)  # 1 s each
    wait_for(lambda: cluster.statuses(ids)["queued"] == 0, 30, "every job to be routed")
    cluster.signal("node-b", signal.SIGSTOP)
    wait_for(lambda: "node-b" not in {n["id"] for n in registry.live_nodes(cluster.redis)}, 30, "node-b to lapse")
    wait_for(lambda: not cluster.redis.exists(registry.assigned_key("node-b")), 30, "the reconciler to forget node-b")
    assert cluster.redis.ttl(node_queue("node-b")) > 0 or not cluster.redis.exists(node_queue("node-b"))
    during = cluster.submit(cluster.tenant.id, 20, max_tokens=100)
    cluster.signal("node-b", signal.SIGCONT)
    resumed_at = time.time()
    cluster.wait_nodes(["node-b"], timeout=30)
    assert cluster.redis.ttl(node_queue("node-b")) == -1 or not cluster.redis.exists(node_queue("node-b"))
    after = cluster.submit(cluster.tenant.id, 20, max_tokens=100)

    rows = cluster.wait_terminal(ids + during + after, timeout=90)
    last = max(r["finished_at"].timestamp() for r in rows) - resumed_at
    on_b = sum(r["node_id"] == "node-b" for r in rows if str(r["id"]) in set(after))
    print(f"(b) node back after a lapse: all {len(rows)} jobs succeeded, the last {last:.1f} s after it "
          f"resumed; {on_b} of the {len(after)} later jobs ran on node-b")
    assert {r["status"] for r in rows} == {"succeeded"}
    exactly_once(cluster, ids + during + after)
    assert last <= RECOVERY_S and on_b > 0


def test_a_result_kept_through_a_long_postgres_outage_is_recorded_once(make_cluster):
    """(c) A finished result that cannot be saved because Postgres stays down longer than the worker's
    outage tolerance (lowered here so the test need not wait two minutes) is parked in Redis and
    recorded when Postgres is back: the job is not re-run and not charged an attempt."""
    cluster = make_cluster(fast=False, own_postgres=True, outage_tolerance=2)
    cluster.start_worker("node-a", token_seconds=0.02)
    cluster.start_router()
    cluster.wait_nodes(["node-a"])
    [job_id] = cluster.submit(cluster.tenant.id, 1, max_tokens=200)  # 4 s of generation
    wait_for(lambda: job_row(cluster, job_id)["status"] == "running", 30, "the job to run")
    cluster.postgres.stop(mode="immediate")
    wait_for(lambda: "parking its outcome" in cluster.log("node-a", tail=50_000), 90, "the outcome to be parked")
    cluster.postgres.start()
    back_at = time.time()

    [row] = cluster.wait_terminal([job_id], timeout=60)
    recorded = row["finished_at"].timestamp() - back_at
    print(f"(c) outcome parked through a Postgres outage: recorded {recorded:.1f} s after Postgres was back")
    assert (row["status"], row["attempt"]) == ("succeeded", 1)
    assert recorded <= RECOVERY_S
    exactly_once(cluster, [job_id])
    assert cluster.attempt_outcomes([job_id])["retried"] == 0


def test_an_engine_failure_nobody_recognises_is_retried_not_failed(make_cluster):
    """(d) An engine exception the adapter does not recognise used to fail the job for good as an
    invalid request; it is an engine failure worth another attempt."""
    cluster = make_cluster(fast=False)
    cluster.start_worker("node-a", SWITCHYARD_SIM_FAIL_MARKER="FLAKY")
    cluster.start_router()
    cluster.wait_nodes(["node-a"])
    [job_id] = cluster.submit(cluster.tenant.id, 1, prompt="FLAKY engine")
    [row] = cluster.wait_terminal([job_id], timeout=60)
    took = (row["finished_at"] - row["created_at"]).total_seconds()
    outcomes = cluster.attempt_outcomes([job_id])
    print(f"(d) unrecognised engine failure: {row['status']} on attempt {row['attempt']} after {took:.1f} s, "
          f"attempt log {dict(outcomes)}")
    assert (row["status"], row["attempt"]) == ("succeeded", 2)
    assert outcomes == {"retried": 1, "succeeded": 1}
    assert took <= RECOVERY_S
    with cluster.db.connection() as conn:
        [first] = conn.execute("SELECT error FROM job_attempts WHERE job_id = %s AND outcome = 'retried'",
                               (job_id,)).fetchall()
    assert first["error"]["type"] == "engine_error"


def test_long_sweeps_never_overlap(make_cluster):
    """(e) The reconciler's lock used to expire after 1 s and never be extended, so a long sweep (here:
    a node dies holding ~200 jobs, each taken back one by one) overlapped the next router's."""
    # Slots for every job: all 600 are on nodes (not waiting in the fair queue) when node-b dies.
    cluster = make_cluster(fast=False, max_num_seqs=64, node_slots=600)
    for node in ("node-a", "node-b", "node-c"):
        cluster.start_worker(node, token_seconds=0.01)  # 2 s per job
    cluster.start_router("router-1")
    cluster.start_router("router-2")
    cluster.wait_nodes(["node-a", "node-b", "node-c"])
    ids = cluster.submit(cluster.tenant.id, 600, max_tokens=200)
    wait_for(lambda: cluster.statuses(ids)["queued"] == 0, 60, "every job to be routed")
    with cluster.db.connection() as conn:
        held = conn.execute("SELECT count(*) AS n FROM jobs WHERE node_id = 'node-b' AND status IN "
                            "('routed', 'running')").fetchone()["n"]
    killed_at = time.time()
    cluster.signal("node-b", signal.SIGKILL)
    rows = cluster.wait_terminal(ids, timeout=120)
    last = max(r["finished_at"].timestamp() for r in rows) - killed_at
    spans = sorted(tuple(float(x) for x in s.decode().split()[1:]) for s in cluster.redis.lrange(SWEEPS_KEY, 0, -1))
    holders = {s.decode().split()[0] for s in cluster.redis.lrange(SWEEPS_KEY, 0, -1)}
    longest = max(end - start for start, end in spans)
    print(f"(e) node-b killed holding {held} jobs: all {len(rows)} succeeded, the last {last:.1f} s after the "
          f"kill; {len(spans)} sweeps logged by {sorted(holders)}, longest {longest:.2f} s")
    assert {r["status"] for r in rows} == {"succeeded"}
    exactly_once(cluster, ids)
    assert held >= 100 and last <= RECOVERY_S
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert not overlaps, f"sweeps overlapped: {overlaps[:3]}"
