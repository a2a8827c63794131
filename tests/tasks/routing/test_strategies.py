"""Routing decisions against real Redis, many concurrent routers' worth of them: the atomic steps keep
global state exact."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.routing import registry
from tasks.routing.strategies import STRATEGIES, affinity_key, ring_order

NODES = [{"id": n, "ewma_job_seconds": None} for n in ("n1", "n2", "n3")]


@pytest.fixture
def clean_redis(redis):
    redis.flushdb()
    yield redis
    redis.flushdb()


def pick_many(redis, strategy: str, n: int, nodes=NODES, key=lambda i: f"job-{i}") -> Counter:
    def pick(i):
        return STRATEGIES[strategy](redis, nodes, model="m", member=f"job-{i}:1", key=key(i))["id"]

    with ThreadPoolExecutor(16) as pool:
        return Counter(pool.map(pick, range(n)))


def test_round_robin_is_exact_under_concurrency(clean_redis):
    assert set(pick_many(clean_redis, "round_robin", 300).values()) == {100}


def test_least_connections_decisions_are_atomic_across_routers(clean_redis):
    clean_redis.sadd(registry.assigned_key("n1"), *[f"old-{i}:1" for i in range(5)])
    counts = pick_many(clean_redis, "least_connections", 301)
    sizes = [clean_redis.scard(registry.assigned_key(n["id"])) for n in NODES]
    assert max(sizes) - min(sizes) <= 1 and counts["n1"] < counts["n2"], (sizes, counts)


def test_weighted_response_time_follows_measured_speed(clean_redis):
    nodes = [{"id": "fast", "ewma_job_seconds": 1.0}, {"id": "slow", "ewma_job_seconds": 3.0}]
    counts = pick_many(clean_redis, "weighted_response_time", 400, nodes=nodes)
    assert 2.5 <= counts["fast"] / counts["slow"] <= 3.5, counts


def test_prefix_affinity_is_sticky_until_the_load_bound(clean_redis):
    # Different sessions spread over the ring; one session's jobs all hash to one node.
    homes = {ring_order(("n1", "n2", "n3"), affinity_key("t", f"s{i}", {}))[0] for i in range(50)}
    assert homes == {"n1", "n2", "n3"}
    one = pick_many(clean_redis, "prefix_affinity", 6, key=lambda i: "s:hot")
    assert len(one) == 1  # light load: all on the home node
    many = pick_many(clean_redis, "prefix_affinity", 60, key=lambda i: "s:hot")
    assert len(many) == 3  # past c × average, the ring's next nodes take the overflow


def test_affinity_key_uses_the_session_else_the_prompt_prefix_within_the_tenant():
    assert affinity_key("t1", "abc", {"prompt": "x"}) == "t1:s:abc" != affinity_key("t2", "abc", {"prompt": "x"})
    same = affinity_key("t1", None, {"prompt": "A" * 300 + "tail one"})
    assert same == affinity_key("t1", None, {"prompt": "A" * 300 + "tail two"})
    assert same != affinity_key("t1", None, {"prompt": "B"}) and same != affinity_key("t2", None, {"prompt": "A" * 300})
