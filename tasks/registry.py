"""The node registry: GPU workers announce themselves in Redis with a heartbeat that expires.

A node is live while its key exists; the key's TTL (settings.heartbeat_ttl) is what takes a silent
node out of rotation, not Redis's visibility timeout.
"""

from __future__ import annotations

import json
import time

NODES_SET = "switchyard:nodes"
_NODE_KEY = "switchyard:node:{}"


def node_queue(node_id: str) -> str:
    return f"node.{node_id}"


def heartbeat(redis, node: dict, ttl: float) -> None:
    """Write (or refresh) one node's record; `node` must hold at least `id` and `models`."""
    record = json.dumps({**node, "heartbeat_at": time.time()})
    with redis.pipeline() as pipe:
        pipe.sadd(NODES_SET, node["id"])
        pipe.set(_NODE_KEY.format(node["id"]), record, px=int(ttl * 1000))
        pipe.execute()


def deregister(redis, node_id: str) -> None:
    with redis.pipeline() as pipe:
        pipe.delete(_NODE_KEY.format(node_id))
        pipe.srem(NODES_SET, node_id)
        pipe.execute()


def live_nodes(redis, model: str | None = None) -> list[dict]:
    """Live nodes sorted by id, optionally only those serving `model`; forgets expired ones."""
    ids = sorted(m.decode() if isinstance(m, bytes) else m for m in redis.smembers(NODES_SET))
    if not ids:
        return []
    records = redis.mget([_NODE_KEY.format(i) for i in ids])
    expired = [i for i, r in zip(ids, records) if r is None]
    if expired:
        redis.srem(NODES_SET, *expired)
    nodes = [json.loads(r) for r in records if r is not None]
    return [n for n in nodes if model is None or model in n.get("models", ())]
