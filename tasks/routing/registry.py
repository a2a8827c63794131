"""The node registry: GPU workers announce themselves in Redis with a heartbeat that expires.

A node is live while its key exists; the key's TTL (settings.heartbeat_ttl) is what takes a silent
node out of rotation, not Redis's visibility timeout. Besides liveness, a node can be out of rotation
because an operator drains it (`drain`), because it reports its engine is not ready (active health),
or because recent jobs failed on it (passive health: a cooldown with exponential back-off).

Each node also has an *assigned set*: the `job:attempt` members routed to it and not yet finished.
Routers add to it atomically with their choice (see tasks.routing.strategies), workers remove from it when a job
ends, and its size is the node's outstanding-job count. A set, unlike a counter, cannot drift when a
message is delivered twice: adding or removing a member twice changes nothing.
"""

from __future__ import annotations

import json
import time

from tasks.names import node_queue
from tasks.routing import fair_queue

NODES_SET = "switchyard:nodes"
_NODE_KEY = "switchyard:node:{}"
_DRAIN_KEY = "switchyard:drain:{}"
_COOLDOWN_KEY = "switchyard:cooldown:{}"
_FAILURES_KEY = "switchyard:failures:{}"
_ASSIGNED_KEY = "switchyard:assigned:{}"


def assigned_key(node_id: str) -> str:
    return _ASSIGNED_KEY.format(node_id)


def member(job_id, attempt: int) -> str:
    return f"{job_id}:{attempt}"


# --- heartbeats -----------------------------------------------------------------------------------


def heartbeat(redis, node: dict, ttl: float) -> None:
    """Write (or refresh) one node's record; `node` must hold at least `id` and `models`."""
    record = json.dumps({**node, "heartbeat_at": time.time()})
    with redis.pipeline() as pipe:
        pipe.sadd(NODES_SET, node["id"])
        pipe.set(_NODE_KEY.format(node["id"]), record, px=int(ttl * 1000))
        pipe.persist(node_queue(node["id"]))  # a live node's queue never expires (see forget_node)
        pipe.execute()


def deregister(redis, node_id: str) -> None:
    with redis.pipeline() as pipe:
        pipe.delete(_NODE_KEY.format(node_id))
        pipe.srem(NODES_SET, node_id)
        pipe.execute()


def live_nodes(redis, model: str | None = None) -> list[dict]:
    """Live nodes sorted by id (optionally only those serving `model`), each with `draining`,
    `cooldown_s` and `outstanding` filled in from Redis. Expired nodes are forgotten."""
    ids = sorted(m.decode() if isinstance(m, bytes) else m for m in redis.smembers(NODES_SET))
    if not ids:
        return []
    with redis.pipeline(transaction=False) as pipe:
        pipe.mget([_NODE_KEY.format(i) for i in ids])
        pipe.mget([_DRAIN_KEY.format(i) for i in ids])
        for i in ids:
            pipe.pttl(_COOLDOWN_KEY.format(i))
        for i in ids:
            pipe.scard(assigned_key(i))
        records, drains, *rest = pipe.execute()
    cooldowns, outstanding = rest[: len(ids)], rest[len(ids):]
    expired = [i for i, r in zip(ids, records) if r is None]
    if expired:
        redis.srem(NODES_SET, *expired)
    nodes = []
    for record, drain, cooldown_ms, n in zip(records, drains, cooldowns, outstanding):
        if record is None:
            continue
        node = json.loads(record)
        if model is not None and model not in node.get("models", ()):
            continue
        node["draining"] = bool(drain) or node.get("draining", False)
        node["cooldown_s"] = round(cooldown_ms / 1000, 1) if cooldown_ms > 0 else 0
        node["outstanding"] = n
        nodes.append(node)
    return nodes


def routable(node: dict) -> bool:
    """In rotation: engine ready (active probe), not drained, not cooling down after failures."""
    return node.get("engine_state") == "ready" and not node["draining"] and not node["cooldown_s"]


def known_models(redis) -> set[str]:
    return {m for n in live_nodes(redis) for m in n.get("models", ())}


# --- operator drain -------------------------------------------------------------------------------


def set_drain(redis, node_id: str, draining: bool) -> None:
    if draining:
        redis.set(_DRAIN_KEY.format(node_id), "1")
    else:
        redis.delete(_DRAIN_KEY.format(node_id))


# --- passive health -------------------------------------------------------------------------------


def record_failure(redis, node_id: str, *, base: float, cap: float) -> float:
    """One more consecutive failure: the node cools down for base × 2^(n-1) s (at most `cap`)."""
    failures = redis.incr(_FAILURES_KEY.format(node_id))
    seconds = min(cap, base * 2 ** (failures - 1))
    redis.set(_COOLDOWN_KEY.format(node_id), failures, px=int(seconds * 1000))
    return seconds


def record_success(redis, node_id: str) -> None:
    """A success ends the back-off: the node is back in rotation with a clean slate."""
    with redis.pipeline() as pipe:
        pipe.delete(_FAILURES_KEY.format(node_id))
        pipe.delete(_COOLDOWN_KEY.format(node_id))
        pipe.execute()


# --- assigned sets --------------------------------------------------------------------------------


def release(redis, node_id: str, members: list[str]) -> None:
    """Jobs that ended (or were skipped) on a node no longer count against it; the dispatcher is
    woken to fill the slots they free."""
    if members:
        redis.srem(assigned_key(node_id), *members)
        fair_queue.wake(redis)


def free_slots(node: dict) -> int:
    """How many more jobs the dispatcher may give a node (negative when it holds more than its slots,
    e.g. after its slots setting was lowered)."""
    return node.get("slots", node.get("batch_capacity", 0)) - node["outstanding"]


def interactive_reserve(node: dict) -> int:
    """Slots of a node that batch-class jobs may not take: kept for interactive jobs."""
    return node.get("slots", 0) - node.get("batch_slots", node.get("slots", 0))


#: how long a dead node's queue is kept for it to come back to
FORGOTTEN_QUEUE_TTL = 24 * 3600


def forget_node(redis, node_id: str) -> None:
    """A dead node's jobs were all re-routed: drop its assignments, and let its queue expire unless
    the node comes back (its next heartbeat makes the queue persistent again).

    The queue is not deleted: a node whose heartbeat merely lapsed may be back a moment later, and a
    router may already have sent it new work. Stale messages left there are harmless (each start is
    fenced by the job's attempt number)."""
    with redis.pipeline() as pipe:
        pipe.delete(assigned_key(node_id))
        pipe.expire(node_queue(node_id), FORGOTTEN_QUEUE_TTL)
        pipe.execute()
