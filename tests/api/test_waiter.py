"""The long-poll waiter on its own, over a real Redis: who is woken, how fast, and what a lost
subscription does."""

from __future__ import annotations

import threading
import time

import pytest

from api.waiter import JobWaiter
from tasks.jobs import notify


@pytest.fixture
def waiter(base_settings):
    return JobWaiter(base_settings.redis_url)


def test_a_finished_job_wakes_its_waiters_only(waiter, redis):
    with waiter.watch("job-a") as a1, waiter.watch("job-a") as a2, waiter.watch("job-b") as b:
        started = time.monotonic()
        notify.job_finished(redis, "job-a")
        assert a1.wait(2) and a2.wait(2)
        assert time.monotonic() - started < 0.2
        assert not b.wait(0.2)


def test_a_waiter_that_left_is_forgotten(waiter, redis):
    with waiter.watch("job-c"):
        pass
    assert "job-c" not in waiter._events
    notify.job_finished(redis, "job-c")  # nobody to wake; nothing breaks


def test_a_lost_subscription_wakes_everyone_to_read_again(waiter, redis):
    """A notification sent while the subscription was down is lost: every waiter must re-read Postgres."""
    with waiter.watch("job-d") as event:
        assert not event.wait(0.1)
        killed = redis.client_kill_filter(_type="pubsub")
        assert killed >= 1
        assert event.wait(5), "the waiter slept through a lost subscription"
    with waiter.watch("job-e") as again:  # and the listener has subscribed again
        notify.job_finished(redis, "job-e")
        assert again.wait(5)


def test_many_waiters_on_one_listener(waiter, redis):
    events = {}
    stack = []
    for i in range(500):
        cm = waiter.watch(f"job-{i}")
        events[i] = cm.__enter__()
        stack.append(cm)
    try:
        assert sum(t.name == "job-waiter" for t in threading.enumerate()) >= 1
        for i in range(0, 500, 2):
            notify.job_finished(redis, f"job-{i}")
        deadline = time.monotonic() + 5
        while not all(events[i].is_set() for i in range(0, 500, 2)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(events[i].is_set() for i in range(0, 500, 2))
        assert not any(events[i].is_set() for i in range(1, 500, 2))
    finally:
        for cm in stack:
            cm.__exit__(None, None, None)
