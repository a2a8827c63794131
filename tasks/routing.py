"""Routing strategies: choose a live node for a job. State that must be shared between router
processes (the round-robin cursor) lives in Redis, so several routers behave like one."""

from __future__ import annotations

_CURSOR_KEY = "switchyard:routing:rr:{}"


def round_robin(redis, nodes: list[dict], *, model: str) -> dict:
    """The next node in id order; INCR is atomic, so concurrent routers never pick the same slot."""
    position = redis.incr(_CURSOR_KEY.format(model)) - 1
    return nodes[position % len(nodes)]


STRATEGIES = {"round_robin": round_robin}
