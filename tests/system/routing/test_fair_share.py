"""Fair share between tenants, on real processes: a router (route task, dispatcher) and two GPU workers
over real Redis and Postgres, with the SimulatedEngine standing in for vLLM (these tests are about
dispatch order, not generation).

The fleet is made the bottleneck on purpose: two nodes of 16 engine seats, each job 50 tokens at
10 ms a token (0.5 s), so about 64 jobs/s, while jobs are submitted several times faster; the backlog
then waits in the fair queue, which is what these tests are about.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

from tasks.jobs import tenants
from tasks.names import route_queue
from tasks.routing import fair_queue
from tests.support import run_in_threads

NODES = ["node-a", "node-b"]
MAX_TOKENS = 50
# Engine seats, and a small buffer per node beyond them (slots = max_num_seqs + batch_size).
WORKER_ENV = {"SWITCHYARD_MAX_NUM_SEQS": "16", "SWITCHYARD_BATCH_SIZE": "4", "SWITCHYARD_BATCH_FLUSH_INTERVAL": "0.02"}


def fleet(make_cluster):
    cluster = make_cluster(redispatch_after=600)
    for node in NODES:
        cluster.start_worker(node, token_seconds=0.01, **WORKER_ENV)
    cluster.start_router("router")
    cluster.wait_nodes(NODES)
    return cluster


def latency(cluster, job_id: str) -> float:
    """Seconds from submit to finish, from the job's own timestamps."""
    row = cluster.wait_terminal([job_id], timeout=60)[0]
    assert row["status"] == "succeeded", row
    return (row["finished_at"] - row["created_at"]).total_seconds()


def one_job(cluster, tenant_id, **kw) -> float:
    return latency(cluster, cluster.submit(tenant_id, 1, max_tokens=MAX_TOKENS, **kw)[0])


def waiting(cluster, tenant_id) -> int:
    depth = fair_queue.depth(cluster.redis, cluster.settings.model_name)
    return sum(d.get(str(tenant_id), 0) for d in depth.values())


def submit_in_threads(cluster, tenant_id, n: int, threads: int = 4, **kw) -> list[str]:
    """Submit n jobs from several threads (in-process, several times faster than the fleet and than an
    API process), and wait until the router has put them all in line: their route messages consumed."""
    per = n // threads
    chunks = run_in_threads([lambda: cluster.submit(tenant_id, per, max_tokens=MAX_TOKENS, **kw)] * threads)
    cluster.wait_until(lambda: cluster.redis.llen(route_queue("round_robin")) == 0, 60, "route queue consumed",
                       watch=["router"])
    return [i for chunk in chunks for i in chunk]


def test_one_job_behind_another_tenants_5000_waits_no_longer_than_twice_its_unloaded_latency(make_cluster):
    cluster = fleet(make_cluster)
    big = cluster.tenant
    small = tenants.create_tenant(cluster.db, "small")[0]
    unloaded = [one_job(cluster, small.id) for _ in range(5)]
    baseline = statistics.median(unloaded)

    submit_in_threads(cluster, big.id, 5000)
    backlog = waiting(cluster, big.id)
    assert backlog > 1000, f"the big tenant's backlog drained too fast to test anything: {backlog} waiting"
    loaded = [one_job(cluster, small.id) for _ in range(3)]
    still = waiting(cluster, big.id)
    print(f"small tenant's job: unloaded {[round(x, 3) for x in unloaded]} s (median {baseline:.3f}), "
          f"behind {backlog} of the big tenant's jobs {[round(x, 3) for x in loaded]} s; {still} still waiting")
    assert still > 500, "the big tenant's backlog must still be there when the last small job finishes"
    assert max(loaded) <= 2 * baseline, (loaded, baseline)


def test_two_saturating_tenants_share_the_fleet_by_weight(make_cluster):
    cluster = fleet(make_cluster)
    heavy = tenants.create_tenant(cluster.db, "heavy")[0]
    light = tenants.create_tenant(cluster.db, "light")[0]
    tenants.set_limits(cluster.db, "heavy", {"share_weight": 2})
    run_in_threads([lambda: submit_in_threads(cluster, heavy.id, 2000, threads=2),
                    lambda: submit_in_threads(cluster, light.id, 2000, threads=2)])
    time.sleep(2)  # past the jobs dispatched while only one tenant had work waiting
    start = time.time()
    time.sleep(15)
    end = time.time()
    assert waiting(cluster, heavy.id) > 0 and waiting(cluster, light.id) > 0, "both must stay backlogged"
    with cluster.db.connection() as conn:
        rows = conn.execute(
            """SELECT tenant_id::text AS tenant, count(*) AS n FROM jobs
                WHERE status = 'succeeded' AND finished_at >= to_timestamp(%s) AND finished_at < to_timestamp(%s)
                GROUP BY tenant_id""", (start, end)).fetchall()
    done = Counter({r["tenant"]: r["n"] for r in rows})
    ratio = done[str(heavy.id)] / done[str(light.id)]
    print(f"finished in {end - start:.0f} s with weights 2 : 1: heavy {done[str(heavy.id)]}, "
          f"light {done[str(light.id)]} (ratio {ratio:.3f})")
    assert abs(ratio - 2) <= 0.2, done


def test_an_interactive_job_goes_ahead_of_a_batch_backlog(make_cluster):
    cluster = fleet(make_cluster)
    t = cluster.tenant
    baseline = statistics.median(one_job(cluster, t.id) for _ in range(5))
    submit_in_threads(cluster, t.id, 3000, priority="batch")
    backlog = waiting(cluster, t.id)
    assert backlog > 1000, f"the batch backlog drained too fast to test anything: {backlog} waiting"
    loaded = [one_job(cluster, t.id) for _ in range(3)]
    print(f"interactive job: unloaded {baseline:.3f} s; behind {backlog} batch jobs of its own tenant "
          f"{[round(x, 3) for x in loaded]} s")
    assert max(loaded) <= 2 * baseline, (loaded, baseline)
    # Batch work did fill the fleet meanwhile: both nodes ran batch jobs.
    with cluster.db.connection() as conn:
        nodes = {r["node_id"] for r in conn.execute(
            "SELECT DISTINCT node_id FROM jobs WHERE priority = 'batch' AND status = 'succeeded'").fetchall()}
    assert nodes == set(NODES), nodes
