"""The dispatcher's own rules, without a broker: back-pressure on the queue, and leases given back when
a task cannot be enqueued (the rows are then due again at the next sweep)."""

from __future__ import annotations

import uuid

import pytest
import redis

from tasks.settings import Settings
from tasks.webhooks import dispatcher as worker


class FakeApp:
    settings = Settings()
    db = object()

    def __init__(self, queued: int, fail_at: int | None = None):
        app = self
        self.redis = type("R", (), {"llen": lambda _self, key: queued + len(app.sent)})()  # nothing consumes
        self.fail_at, self.sent = fail_at, []

    def send_task(self, name, args, queue):
        if len(self.sent) == self.fail_at:
            raise redis.ConnectionError("broker away")
        self.sent.append((name, args, queue))


@pytest.fixture
def rows(monkeypatch):
    claimed, released = [], []

    def claim_due(pool, *, limit, lease_seconds, per_tenant):
        batch = [{"id": uuid.uuid4(), "attempts": 2} for _ in range(min(limit, 3 - len(claimed)))]
        claimed.extend(batch)
        return batch

    monkeypatch.setattr(worker.store, "claim_due", claim_due)
    monkeypatch.setattr(worker.store, "release", lambda pool, ids: released.extend(ids))
    return claimed, released


def test_dispatches_due_rows_as_their_next_attempt(rows):
    claimed, _ = rows
    app = FakeApp(queued=0)
    assert worker.Dispatcher(app, None).dispatch_due() == 3
    assert app.sent == [("switchyard.deliver_webhook", [str(r["id"]), 3], "webhooks") for r in claimed]


def test_a_full_queue_stops_dispatching(rows):
    claimed, _ = rows
    app = FakeApp(queued=worker.Dispatcher.queue_limit)
    assert worker.Dispatcher(app, None).dispatch_due() == 0 and claimed == [] and app.sent == []
    app = FakeApp(queued=worker.Dispatcher.queue_limit - 2)
    assert worker.Dispatcher(app, None).dispatch_due() == 2  # only the room left


def test_leases_are_given_back_when_enqueueing_fails(rows):
    claimed, released = rows
    app = FakeApp(queued=0, fail_at=1)
    with pytest.raises(redis.ConnectionError):
        worker.Dispatcher(app, None).dispatch_due()
    assert len(app.sent) == 1 and released == [r["id"] for r in claimed[1:]]
