"""Admission (api/admission.py) on its own: a worker works on at most its limit of requests at once,
the rest wait their turn; a request waiting for a job holds no slot; health checks take none. Plain
threads stand in for gevent's greenlets (gunicorn patches `threading` with them)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask

from api.admission import Admission, released

LIMIT = 2


@pytest.fixture
def server():
    app = Flask("admission-test")
    state = {"active": 0, "most": 0, "lock": threading.Lock(), "hold": threading.Event(), "log": []}

    def working(seconds: float) -> None:
        with state["lock"]:
            state["active"] += 1
            state["most"] = max(state["most"], state["active"])
        time.sleep(seconds)
        with state["lock"]:
            state["active"] -= 1

    @app.get("/work")
    def work():
        working(0.05)
        state["log"].append(("work", time.monotonic()))
        return "done"

    @app.get("/block")
    def block():
        state["hold"].wait(10)
        return "unblocked"

    @app.get("/wait")
    def wait():
        working(0.01)
        with released():  # as a long-poll waits for its job
            time.sleep(0.5)
        working(0.01)
        state["log"].append(("wait", time.monotonic()))
        return "waited"

    @app.get("/healthz")
    def healthz():
        return "ok"

    app.wsgi_app = Admission(app.wsgi_app, LIMIT)
    app.state = state
    return app


def _get(app, path: str) -> tuple[int, str]:
    r = app.test_client().get(path)
    return r.status_code, r.get_data(as_text=True)


def test_a_burst_is_worked_on_a_few_at_a_time_and_every_request_is_answered(server):
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: _get(server, "/work"), range(16)))
    assert answers == [(200, "done")] * 16
    assert server.state["most"] == LIMIT


def test_a_request_waiting_for_a_job_holds_no_slot(server):
    with ThreadPoolExecutor(8) as pool:
        waits = [pool.submit(_get, server, "/wait") for _ in range(4)]  # twice the limit, all waiting
        time.sleep(0.1)
        works = [pool.submit(_get, server, "/work") for _ in range(4)]
        assert [f.result() for f in works] == [(200, "done")] * 4
        assert [f.result() for f in waits] == [(200, "waited")] * 4
    log = server.state["log"]
    last_work = max(t for kind, t in log if kind == "work")
    first_wait = min(t for kind, t in log if kind == "wait")
    assert last_work < first_wait  # the submits went ahead while four waits held the two slots' worth
    assert server.state["most"] <= LIMIT


def test_health_checks_answer_while_every_slot_is_taken(server):
    with ThreadPoolExecutor(LIMIT + 1) as pool:
        blockers = [pool.submit(_get, server, "/block") for _ in range(LIMIT)]
        time.sleep(0.1)
        queued = pool.submit(_get, server, "/work")
        started = time.monotonic()
        assert _get(server, "/healthz") == (200, "ok")
        assert time.monotonic() - started < 1
        assert not queued.done()  # it waits for a slot ...
        server.state["hold"].set()
        assert queued.result(5) == (200, "done")  # ... and is answered once one is free
        assert [f.result() for f in blockers] == [(200, "unblocked")] * LIMIT


def test_released_outside_a_request_does_nothing():
    with released():
        pass
