"""GPU worker health for Kubernetes exec probes: `python -m workers.health [--ready]`.

A worker serves no HTTP; its health is its heartbeat in the node registry, which its heartbeat thread
writes every SWITCHYARD_HEARTBEAT_INTERVAL s once the engine is loaded. The probe is a process of its
own, so SWITCHYARD_NODE_ID must name the worker's node (the default id, hostname-pid, would be the
probe's own).

- alive (no flag): fails only when Redis answers and the node has no live heartbeat, i.e. the worker is
  wedged or its heartbeat thread is gone. An unreachable Redis is no fault of the worker's, and the
  worker rides out the outage itself: restarting it would only cost the jobs in its engine an attempt.
- ready (`--ready`): the heartbeat is live, the engine reports `ready` and the node is not draining:
  it takes work.

Exit status 0 when healthy, else 1; the line printed says why (`kubectl describe pod` shows it).
"""

from __future__ import annotations

import argparse
import sys

import redis as redis_lib

from tasks.routing import registry
from tasks.settings import Settings


def check(redis, node_id: str, *, ready: bool) -> tuple[bool, str]:
    """(healthy, why) for one node."""
    try:
        node = next((n for n in registry.live_nodes(redis) if n["id"] == node_id), None)
    except redis_lib.RedisError as exc:
        return not ready, f"Redis unreachable ({type(exc).__name__}): cannot see node {node_id}"
    if node is None:
        return False, f"node {node_id} has no live heartbeat"
    if ready and node.get("engine_state") != "ready":
        return False, f"node {node_id}: engine {node.get('engine_state')}"
    if ready and node["draining"]:
        return False, f"node {node_id} is draining"
    return True, f"node {node_id}: heartbeat live" + (", engine ready" if ready else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.health", description=__doc__.splitlines()[0])
    parser.add_argument("--ready", action="store_true",
                        help="readiness: the node takes work (default: liveness)")
    args = parser.parse_args(argv)
    settings = Settings.from_env().require_urls()
    if "node_id" not in settings.model_fields_set:
        print("SWITCHYARD_NODE_ID is not set: the probe cannot tell which node to check")
        return 1
    # Short timeouts: the probe must answer within the kubelet's timeoutSeconds.
    client = redis_lib.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        healthy, why = check(client, settings.node_id, ready=args.ready)
    finally:
        client.close()
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
