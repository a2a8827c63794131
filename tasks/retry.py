"""Retry policy: which failures are worth another attempt, how long to wait, and how workers ride out
a short Postgres or Redis outage instead of dropping the work in hand."""

from __future__ import annotations

import logging
import random
import time

import psycopg
import psycopg_pool
import redis

log = logging.getLogger(__name__)

#: error types (the `type` of a job's error) that another attempt may cure; everything else is permanent
RETRYABLE = frozenset({"engine_dead", "engine_overloaded", "worker_lost", "transient"})

#: exceptions that mean "a backing service is briefly unreachable"
TRANSIENT = (psycopg.OperationalError, psycopg_pool.PoolTimeout, redis.ConnectionError, redis.TimeoutError)


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential with full jitter (AWS's advice), so
    retries of many jobs that failed together don't arrive together."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def ride_out(fn, *, tolerance: float, what: str):
    """Call `fn()` until it stops raising TRANSIENT errors or `tolerance` seconds have passed."""
    deadline = time.monotonic() + tolerance
    attempt = 0
    while True:
        try:
            return fn()
        except TRANSIENT as exc:
            attempt += 1
            if time.monotonic() >= deadline:
                raise
            delay = min(5.0, 0.2 * 2 ** min(attempt, 5))
            log.warning("%s failed (%s); retrying in %.1f s", what, exc.__class__.__name__, delay)
            time.sleep(delay)
