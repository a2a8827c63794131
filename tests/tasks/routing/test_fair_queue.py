"""The fair queue against real Redis: service order between tenants, weights, priority classes, and the
bookkeeping the reconciler and dispatcher rely on."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.routing import fair_queue
from tasks.routing.fair_queue import BATCH, INTERACTIVE, Entry

MODEL = "m"


@pytest.fixture
def clean_redis(redis):
    redis.flushdb()
    yield redis
    redis.flushdb()


def entry(tenant: str, i: int, *, priority: str = INTERACTIVE, cost: int = 10) -> Entry:
    return Entry(job_id=f"{tenant}-{i}", attempt=1, strategy="round_robin", affinity_key=None, enqueued_at=0.0,
                 tenant=tenant, priority=priority, cost=cost)


def push_many(redis, tenant: str, n: int, weight: float = 1.0, **kw) -> None:
    for i in range(n):
        fair_queue.push(redis, MODEL, entry(tenant, i, **kw), weight=weight)


def take(redis, n: int, batch: int | None = None) -> list[Entry]:
    return fair_queue.pop(redis, MODEL, {INTERACTIVE: n, BATCH: n if batch is None else batch})


def test_one_job_of_an_idle_tenant_is_next_however_long_the_backlog(clean_redis):
    push_many(clean_redis, "big", 5000)
    assert [e.tenant for e in take(clean_redis, 100)] == ["big"] * 100
    fair_queue.push(clean_redis, MODEL, entry("small", 0), weight=1.0)
    first = take(clean_redis, 2)
    assert [e.tenant for e in first] == ["small", "big"], first  # it starts at the virtual time: behind no one


def test_backlogged_tenants_share_by_weight(clean_redis):
    push_many(clean_redis, "heavy", 1000, weight=2.0)
    push_many(clean_redis, "light", 1000, weight=1.0)
    served = Counter(e.tenant for e in take(clean_redis, 300))
    assert served == {"heavy": 200, "light": 100}, served


def test_cost_counts_not_job_count(clean_redis):
    push_many(clean_redis, "long", 100, cost=300)
    push_many(clean_redis, "short", 1000, cost=100)
    served = Counter(e.tenant for e in take(clean_redis, 400))
    assert served == {"long": 100, "short": 300}, served  # 30,000 token budget each


def test_idling_earns_no_credit(clean_redis):
    push_many(clean_redis, "a", 10)
    take(clean_redis, 10)  # a is served alone: its tag runs ahead of ...
    push_many(clean_redis, "b", 2000)
    take(clean_redis, 1000)  # ... then b is served alone, and the clock moves on
    push_many(clean_redis, "a", 10)
    served = Counter(e.tenant for e in take(clean_redis, 20))
    assert served == {"a": 10, "b": 10}, served  # a comes back level with b, not 990 jobs ahead


def test_interactive_before_batch_and_batch_within_its_limit(clean_redis):
    push_many(clean_redis, "t", 50, priority=BATCH)
    assert len(take(clean_redis, 10, batch=3)) == 3
    fair_queue.push(clean_redis, MODEL, entry("t", 999, priority=INTERACTIVE), weight=1.0)
    got = take(clean_redis, 2, batch=2)
    assert [e.priority for e in got] == [INTERACTIVE, BATCH], got


def test_pending_tracks_waiting_jobs_and_models(clean_redis):
    push_many(clean_redis, "t", 3)
    assert fair_queue.waiting_models(clean_redis) == {MODEL}
    assert fair_queue.pending(clean_redis, ["t-0", "t-2", "nope"]) == {"t-0", "t-2"}
    assert fair_queue.depth(clean_redis, MODEL) == {INTERACTIVE: {"t": 3}, BATCH: {}}
    assert clean_redis.llen(fair_queue.backlog_key(MODEL)) == 3
    take(clean_redis, 2)
    assert clean_redis.llen(fair_queue.backlog_key(MODEL)) == 1
    take(clean_redis, 1)
    assert fair_queue.pending(clean_redis, ["t-0", "t-2"]) == set()
    assert fair_queue.waiting_models(clean_redis) == set()
    assert take(clean_redis, 5) == []


def test_concurrent_dispatchers_take_each_job_once(clean_redis):
    push_many(clean_redis, "a", 500)
    push_many(clean_redis, "b", 500)
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: take(clean_redis, 7), range(200)))
    ids = [e.job_id for b in batches for e in b]
    assert len(ids) == len(set(ids)) == 1000
    assert clean_redis.llen(fair_queue.backlog_key(MODEL)) == 0


def test_an_unknown_class_is_refused(clean_redis):
    with pytest.raises(ValueError, match="priority must be one of"):
        fair_queue.push(clean_redis, MODEL, entry("t", 0, priority="urgent"), weight=1.0)
