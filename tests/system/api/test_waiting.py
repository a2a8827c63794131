"""Waiting costs no thread: one API instance (gunicorn, gevent workers, as `make up` runs it) holds
10,000 concurrent long-polls in under 1 GiB, wakes each within 200 ms (p99) of its job finishing, and
answers a submit or a health check at once meanwhile; a tenant beyond its cap of waits gets 429.

No router or worker runs: the jobs stay queued until the test cancels them, one after another, which
finishes them exactly as a worker's outcome does (a notification on the jobs' channel)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import psutil
import requests

from api.limits import WAITS_KEY
from ops.crowd import follow_all
from ops.stats import percentile
from tasks.jobs import lifecycle, tenants

WAITERS = int(os.environ.get("SWITCHYARD_TEST_WAITERS", "10000"))


def _api_memory(cluster) -> int:
    """Resident memory of the API's gunicorn master and workers together (RSS: shared pages counted
    in each process, so this overstates what they use)."""
    master = psutil.Process(cluster.pid("api"))
    return sum(p.memory_info().rss for p in [master, *master.children(recursive=True)])


def _api_settled(cluster, timeout: float = 120) -> float:
    """Wait until the API's processes are idle (under 10 % of a core over half a second): every
    long-poll has been read, checked and parked. Its slot is taken before the job is read again and the
    waiter registered, so a full count of slots comes before that; a job finishing meanwhile would be
    measured against an API still busy taking the crowd in. Returns the seconds waited."""
    master = psutil.Process(cluster.pid("api"))
    started = time.monotonic()

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in [master, *master.children(recursive=True)])

    while time.monotonic() - started < timeout:
        before = cpu()
        time.sleep(0.5)
        if cpu() - before < 0.05:
            return time.monotonic() - started
    raise AssertionError(f"the API was still busy {timeout:.0f} s after every long-poll had its slot")


def _timed(method, url, **kwargs) -> float:
    started = time.monotonic()
    response = method(url, timeout=10, **kwargs)
    assert response.status_code < 300, response.text
    return time.monotonic() - started


def test_ten_thousand_long_polls_wait_without_threads_and_wake_at_once(make_cluster):
    cluster = make_cluster(max_waits_per_tenant=WAITERS)
    tenant, key = tenants.create_tenant(cluster.db, "crowd")
    cluster.start_api()
    cluster.wait_api()
    started = time.monotonic()
    ids = cluster.submit(tenant.id, WAITERS, max_tokens=4)
    print(f"{WAITERS} jobs submitted in {time.monotonic() - started:.1f} s")

    outcomes: list = []
    crowd = threading.Thread(target=lambda: outcomes.extend(
        asyncio.run(follow_all(cluster.api, {i: key for i in ids}, wait=60, timeout=300))))
    crowd.start()
    waiting = WAITS_KEY.format(tenant.id)
    cluster.wait_until(lambda: cluster.redis.zcard(waiting) >= WAITERS, 180, f"{WAITERS} long-polls waiting",
                       watch=["api"], interval=0.5)
    print(f"{WAITERS} long-polls waiting {time.monotonic() - started:.1f} s after the first submit; "
          f"the API settled {_api_settled(cluster):.1f} s later")
    memory = _api_memory(cluster)

    # Meanwhile, another client's submit and health check are answered at once.
    headers = {"Authorization": f"Bearer {key}"}
    submits = [_timed(requests.post, f"{cluster.api}/v1/jobs", headers=headers,
                      json={"prompt": "hi", "max_tokens": 4}) for _ in range(20)]
    health = [_timed(requests.get, f"{cluster.api}/healthz") for _ in range(20)]

    # The clients' own clock is what is measured: no collection of this process's heap (every test
    # before this one in a full run) may pause it while the answers arrive (as timeit does).
    gc.collect()
    gc.disable()
    try:
        cancelled_at = {}
        for job_id in ids:
            lifecycle.cancel(cluster.celery, job_id, tenant.id)
            cancelled_at[job_id] = time.time()
        crowd.join(120)
    finally:
        gc.enable()
    assert not crowd.is_alive()

    failed = [o for o in outcomes if o.error or o.status != "cancelled"]
    assert len(outcomes) == WAITERS and not failed, failed[:5]
    wake = [o.heard_at - cancelled_at[o.job_id] for o in outcomes]
    print(f"API memory with {WAITERS} waiting: {memory / 2**20:.0f} MiB (RSS, master + workers); wake-up after "
          f"the job finished: p50 {percentile(wake, 50) * 1000:.0f} ms, p99 {percentile(wake, 99) * 1000:.0f} ms, "
          f"max {max(wake) * 1000:.0f} ms; meanwhile submit max {max(submits) * 1000:.0f} ms, "
          f"/healthz max {max(health) * 1000:.0f} ms; requests per client: {max(o.requests for o in outcomes)} max")
    assert memory < 2**30
    assert percentile(wake, 99) < 0.2
    assert max(submits) < 1.0 and max(health) < 1.0
    assert cluster.redis.zcard(waiting) == 0  # every slot given back


def test_a_tenant_beyond_its_cap_of_waits_gets_429_and_others_still_wait(make_cluster):
    cluster = make_cluster(max_waits_per_tenant=3)
    greedy, greedy_key = tenants.create_tenant(cluster.db, "greedy")
    other, other_key = tenants.create_tenant(cluster.db, "other")
    cluster.start_api()
    cluster.wait_api()
    held = cluster.submit(greedy.id, 3)
    [extra] = cluster.submit(greedy.id, 1)
    [theirs] = cluster.submit(other.id, 1)

    outcomes: list = []
    crowd = threading.Thread(target=lambda: outcomes.extend(
        asyncio.run(follow_all(cluster.api, {**{i: greedy_key for i in held}, theirs: other_key}, wait=30))))
    crowd.start()
    cluster.wait_until(lambda: cluster.redis.zcard(WAITS_KEY.format(greedy.id)) == 3
                       and cluster.redis.zcard(WAITS_KEY.format(other.id)) == 1, 30, "4 long-polls waiting")
    refused = requests.get(f"{cluster.api}/v1/jobs/{extra}", params={"wait": 5},
                           headers={"Authorization": f"Bearer {greedy_key}"}, timeout=10)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "3 long-polls" in refused.json()["detail"]
    polled = requests.get(f"{cluster.api}/v1/jobs/{extra}", headers={"Authorization": f"Bearer {greedy_key}"},
                          timeout=10)
    assert polled.status_code == 200 and polled.json()["status"] == "queued"  # a plain poll is not capped

    for job_id, tenant in [*((i, greedy) for i in held), (theirs, other)]:
        lifecycle.cancel(cluster.celery, job_id, tenant.id)
    crowd.join(30)
    assert sorted(o.status for o in outcomes) == ["cancelled"] * 4 and not any(o.error for o in outcomes)
