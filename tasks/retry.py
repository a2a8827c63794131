"""Retry timing: how long a retried job waits, and how workers ride out a short Postgres or Redis
outage instead of dropping the work in hand. What is worth retrying is defined in tasks.errors."""

from __future__ import annotations

import logging
import random
import time

from tasks.errors import TRANSIENT

log = logging.getLogger(__name__)


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
