"""Routing strategies: choose a node for a job among the routable ones.

Every choice and the bookkeeping it needs happen in one atomic Redis step (a counter or a Lua
script), so several router processes together behave like one:

- round_robin: a shared cursor (INCR) over the nodes in id order.
- least_connections: the node with the fewest outstanding jobs (its assigned set's size).
- weighted_response_time: the node with the least expected wait, (outstanding + 1) × the node's EWMA
  seconds per job, so a node 3× faster takes about 3× the work.
- prefix_affinity: consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018)
  on the job's affinity key (its session id, else a digest of its prompt prefix): the first node on
  the hash ring whose outstanding count stays within c × the average (or a small floor); follow-up
  turns reuse that node's vLLM prefix cache, and a hot session spills over instead of piling onto
  one node.

Every strategy adds the job to the chosen node's assigned set in the same step.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from functools import lru_cache

from tasks.routing import registry

_CURSOR_KEY = "switchyard:routing:rr:{}"
PREFIX_CHARS = 256  # how much of a prompt identifies its prefix when no session id is given
VIRTUAL_NODES = 64  # points per node on the hash ring
LOAD_BOUND = 1.25  # prefix affinity: a node may hold at most this × the average outstanding (+1) ...
LOAD_FLOOR = 8  # ... or this many, whichever is more: a nearly idle cluster has no reason to spill

# KEYS: candidates' assigned sets; ARGV: member, then one weight per candidate.
# Picks the lowest (outstanding + 1) × weight, first candidate on ties.
_LEAST_SCORE = """
local best, best_score = 1, nil
for i, key in ipairs(KEYS) do
  local score = (redis.call('SCARD', key) + 1) * tonumber(ARGV[i + 1])
  if best_score == nil or score < best_score then best, best_score = i, score end
end
redis.call('SADD', KEYS[best], ARGV[1])
return best - 1
"""

# KEYS: assigned sets in hash-ring order from the job's key; ARGV: member, load bound factor c, floor.
# Picks the first node whose outstanding + 1 stays within max(ceil(c × (total + 1) / n), floor).
_BOUNDED_RING = """
local counts, total = {}, 0
for i, key in ipairs(KEYS) do counts[i] = redis.call('SCARD', key); total = total + counts[i] end
local bound = math.max(math.ceil(tonumber(ARGV[2]) * (total + 1) / #KEYS), tonumber(ARGV[3]))
for i, key in ipairs(KEYS) do
  if counts[i] + 1 <= bound then redis.call('SADD', key, ARGV[1]); return i - 1 end
end
redis.call('SADD', KEYS[1], ARGV[1])
return 0
"""


def affinity_key(tenant_id, session_id: str | None, request: dict) -> str:
    """What prefix affinity hashes: the tenant's session, else the first PREFIX_CHARS of the prompt,
    within the tenant (one tenant's keys never steer, or reveal, another's placement)."""
    if session_id:
        return f"{tenant_id}:s:{session_id}"
    text = request.get("prompt") or json.dumps(request.get("messages") or [], ensure_ascii=False)
    return f"{tenant_id}:p:" + hashlib.blake2b(text[:PREFIX_CHARS].encode(), digest_size=12).hexdigest()


def _hash(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=64)
def _ring(node_ids: tuple[str, ...]) -> tuple[list[int], list[str]]:
    points = sorted((_hash(f"{n}#{v}"), n) for n in node_ids for v in range(VIRTUAL_NODES))
    return [p for p, _ in points], [n for _, n in points]


def ring_order(node_ids: tuple[str, ...], key: str) -> list[str]:
    """The distinct nodes met walking the hash ring clockwise from `key`."""
    hashes, owners = _ring(node_ids)
    start = bisect.bisect(hashes, _hash(key))
    order: list[str] = []
    for i in range(len(owners)):
        node = owners[(start + i) % len(owners)]
        if node not in order:
            order.append(node)
            if len(order) == len(node_ids):
                break
    return order


def round_robin(redis, nodes: list[dict], *, model: str, member: str, key: str) -> dict:
    """The next node in id order; INCR is atomic, so concurrent routers never pick the same slot."""
    node = nodes[(redis.incr(_CURSOR_KEY.format(model)) - 1) % len(nodes)]
    redis.sadd(registry.assigned_key(node["id"]), member)
    return node


def _least(redis, nodes: list[dict], member: str, weights: list[float]) -> dict:
    # Shuffled so that ties go to a random node: always favouring the first would leave it one job
    # ahead of the rest whenever counts are level, giving it more than its share of the work.
    order = random.sample(range(len(nodes)), len(nodes))
    script = redis.register_script(_LEAST_SCORE)
    index = script(keys=[registry.assigned_key(nodes[i]["id"]) for i in order],
                   args=[member, *(weights[i] for i in order)])
    return nodes[order[int(index)]]


def least_connections(redis, nodes: list[dict], *, model: str, member: str, key: str) -> dict:
    return _least(redis, nodes, member, [1.0] * len(nodes))


def weighted_response_time(redis, nodes: list[dict], *, model: str, member: str, key: str) -> dict:
    measured = [n["ewma_job_seconds"] for n in nodes if n.get("ewma_job_seconds")]
    default = sum(measured) / len(measured) if measured else 1.0  # a new node is assumed average
    return _least(redis, nodes, member, [n.get("ewma_job_seconds") or default for n in nodes])


def prefix_affinity(redis, nodes: list[dict], *, model: str, member: str, key: str) -> dict:
    by_id = {n["id"]: n for n in nodes}
    order = ring_order(tuple(sorted(by_id)), key)
    script = redis.register_script(_BOUNDED_RING)
    index = script(keys=[registry.assigned_key(n) for n in order], args=[member, LOAD_BOUND, LOAD_FLOOR])
    return by_id[order[int(index)]]


STRATEGIES = {
    "round_robin": round_robin,
    "least_connections": least_connections,
    "weighted_response_time": weighted_response_time,
    "prefix_affinity": prefix_affinity,
}
#: the strategies' names, in order: one `route.<name>` queue each
NAMES = tuple(STRATEGIES)
