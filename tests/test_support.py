"""The shared test helpers hand a thread's failure to the test (tests/support.py)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support import in_background, run_in_threads


def test_run_in_threads_returns_results_in_order_and_runs_them_at_once():
    barrier = threading.Barrier(5, timeout=5)  # passes only if all five run at the same time

    def call(i):
        barrier.wait()
        return i * i

    assert run_in_threads([lambda i=i: call(i) for i in range(5)]) == [0, 1, 4, 9, 16]


def test_run_in_threads_raises_a_threads_exception_at_once():
    def slow():
        time.sleep(5)

    def broken():
        raise ValueError("boom in a thread")

    started = time.monotonic()
    with pytest.raises(ValueError, match="boom in a thread"):
        run_in_threads([slow, broken, slow])
    assert time.monotonic() - started < 2  # not after the slow ones end


def test_run_in_threads_times_out():
    with pytest.raises(TimeoutError, match="1 of 2 threads"):
        run_in_threads([lambda: None, lambda: time.sleep(2)], timeout=0.2)


def test_in_background_raises_the_threads_exception_on_leaving():
    def sampler(stop):
        stop.wait(0.05)
        raise RuntimeError("sampler died")

    with pytest.raises(RuntimeError, match="sampler died"):
        with in_background(sampler):
            time.sleep(0.2)


def test_in_background_stops_the_thread():
    ticks = []

    def sampler(stop):
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.01)

    with in_background(sampler):
        time.sleep(0.1)
    n = len(ticks)
    time.sleep(0.05)
    assert n > 0 and len(ticks) == n
