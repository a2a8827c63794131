"""Helpers shared by the test packages (conftest.py files hold fixtures only).

Threads: an exception raised in a plain `threading.Thread` ends that thread and is only reported
(pytest turns it into a warning); the test goes on and may pass on partial data. `run_in_threads` and
`in_background` hand every thread's exception back to the test's own thread and raise it there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def auth(key: str) -> dict:
    """The Authorization header for an API key."""
    return {"Authorization": f"Bearer {key}"}


def job_count(pool, tenant_id=None) -> int:
    """Jobs in the database, of one tenant or of all."""
    with pool.connection() as conn:
        return conn.execute("SELECT count(*) AS n FROM jobs WHERE %s::uuid IS NULL OR tenant_id = %s::uuid",
                            (tenant_id, tenant_id)).fetchone()["n"]



def run_in_threads(calls: Iterable[Callable[[], T]], *, timeout: float | None = None) -> list[T]:
    """Run each call in a thread of its own, all at once, and return their results in order.

    The first exception raised by any call is raised here as soon as it happens (calls still running
    are left to end on their own); a call still running after `timeout` seconds raises TimeoutError."""
    calls = list(calls)
    if not calls:
        return []
    pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="test-thread")
    futures = [pool.submit(call) for call in calls]
    failed = True
    try:
        done, pending = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(calls)} threads still running after {timeout} s")
        failed = False
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=not failed, cancel_futures=True)


@contextmanager
def in_background(target: Callable[[threading.Event], None], *,
                  join_timeout: float = 30) -> Iterator[threading.Event]:
    """Run `target(stop)` in a thread for the length of the with-block. On leaving the block `stop` is
    set and the thread joined; an exception it raised is raised here (unless the block itself raised)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread below
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-background", daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(join_timeout)
    if thread.is_alive():
        raise TimeoutError(f"background thread {target!r} did not stop within {join_timeout} s")
    if errors:
        raise errors[0]


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """A Prometheus text exposition, parsed by prometheus_client's own parser (so text that does not
    parse fails the test): {(sample name, frozenset of its labels): value}. A sample seen twice (two
    processes each reporting one fact) raises."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            if key in found:
                raise AssertionError(f"sample {sample.name}{sample.labels} exported twice")
            found[key] = sample.value
    return found


def metric_value(samples: dict, name: str, **labels) -> float:
    """The value of one sample (0 when absent: a counter not yet counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
