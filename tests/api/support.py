"""Helpers for the API tests."""

from __future__ import annotations


def queued_messages(redis_client) -> int:
    """Messages waiting on any `route.*` queue (kombu keeps each queue as a Redis list)."""
    return sum(redis_client.llen(k) for k in redis_client.scan_iter("route.*") if redis_client.type(k) == b"list")
