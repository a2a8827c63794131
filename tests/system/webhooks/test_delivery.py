"""Delivery end to end: jobs change status through the store, the trigger writes the event, the webhooks
workers (real processes) send it to a real HTTP receiver on loopback."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tasks.jobs import store, tenants
from tasks.webhooks import signing
from tasks.webhooks import store as webhooks
from tasks.jobs.status import JobStatus
from tests.receiver import Receiver, canary_silent, internal_urls
from tests.system.webhooks.support import JITTER, SCHEDULE, attempts, deliveries, finish, new_job, run_to_end, wait_until

pytestmark = pytest.mark.usefixtures("webhook_workers")


def _path() -> str:
    return f"/hook/{uuid.uuid4().hex[:12]}"


def _settled(db, job_id, n: int = 1):
    """The job's deliveries once `n` exist and none is pending."""
    def check():
        rows = deliveries(db, job_id)
        return rows if len(rows) >= n and all(r["status"] != "pending" for r in rows) else None
    return wait_until(check, what=f"deliveries of {job_id} settled")


def test_events_follow_status_changes_and_subscriptions(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    job = new_job(db, t.id, receiver.url(path), events=["job.running", "job.succeeded"])
    run_to_end(db, job)
    receiver.wait(lambda rs: len([r for r in rs if r.path == path]) == 2)
    got = sorted(receiver.at(path), key=lambda r: r.event["timestamp"])  # arrival order is not guaranteed
    assert [r.event["type"] for r in got] == ["job.running", "job.succeeded"]
    assert got[0].event["data"]["status"] == "running" and got[1].event["data"]["status"] == "succeeded"
    assert got[0].id != got[1].id
    assert not finish(db, job, JobStatus.SUCCEEDED)  # a duplicate result: no transition, no new event
    # Not subscribed to job.cancelled: no delivery row at all.
    other = new_job(db, t.id, receiver.url(path), events=["job.succeeded"])
    assert store.cancel_job(db, other["id"], t.id, {"type": "cancelled", "message": "by the test"})
    assert deliveries(db, other["id"]) == [] and len(deliveries(db, job["id"])) == 2


def test_failed_and_cancelled_events(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    failed, cancelled = new_job(db, t.id, receiver.url(path)), new_job(db, t.id, receiver.url(path))
    run_to_end(db, failed, JobStatus.FAILED)
    store.cancel_job(db, cancelled["id"], t.id, {"type": "cancelled", "message": "by the test"})
    receiver.wait(lambda rs: len([r for r in rs if r.path == path]) == 2)
    by_job = {r.event["data"]["id"]: r.event for r in receiver.at(path)}
    assert by_job[str(failed["id"])]["type"] == "job.failed"
    assert by_job[str(failed["id"])]["data"]["error"] == {"type": "engine", "message": "boom"}
    assert by_job[str(cancelled["id"])]["type"] == "job.cancelled"


def test_500_three_times_then_200_is_delivered_on_the_4th_attempt_with_one_id(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    receiver.script(path, (500, {}), (500, {}), (500, {}))
    job = new_job(db, t.id, receiver.url(path))
    run_to_end(db, job)
    [row] = _settled(db, job["id"])
    got = receiver.at(path)
    assert len(got) == 4 and {r.id for r in got} == {str(row["id"])}
    assert row["status"] == "delivered" and row["attempts"] == 4
    log = attempts(db, row["id"])
    assert [a["status_code"] for a in log] == [500, 500, 500, 200]
    assert all(a["latency_ms"] is not None and a["started_at"] for a in log)
    assert log[0]["error"].startswith("HTTP 500") and log[3]["error"] is None
    # Spaced by the schedule (with its jitter), each signed afresh.
    gaps = [b.at - a.at for a, b in zip(got, got[1:])]
    for gap, delay in zip(gaps, SCHEDULE):
        assert delay * (1 - JITTER) <= gap < delay * (1 + JITTER) + 1.0, gaps
    secret = webhooks.current_secret(db, t.id)["secret"]
    for r in got:
        Webhook(secret).verify(r.body, r.headers)
    assert len({r.body for r in got}) == 1  # the same event every time


def test_receiver_down_then_back_is_delivered_within_the_schedule(db, tenant, spare_port):
    t, _ = tenant
    job = new_job(db, t.id, f"http://127.0.0.1:{spare_port}/back")
    run_to_end(db, job)
    [delivery] = wait_until(lambda: [d for d in deliveries(db, job["id"]) if d["attempts"] >= 3
                                     and attempts(db, d["id"])[2]["error"] != webhooks.LOST_ATTEMPT],
                            what="three refused attempts")
    refused = attempts(db, delivery["id"])
    assert all(a["status_code"] is None and "refused" in a["error"].lower() for a in refused[:3]), refused
    back = Receiver(port=spare_port).start()
    try:
        [row] = _settled(db, job["id"])
        assert row["status"] == "delivered" and back.at("/back")[0].id == str(row["id"])
        within = sum(SCHEDULE[:row["attempts"] - 1]) * (1 + JITTER) + 2
        assert row["delivered_at"] - row["created_at"] <= timedelta(seconds=within)
    finally:
        back.stop()


def test_retry_after_is_honoured(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    receiver.script(path, (503, {"Retry-After": "2"}))
    job = new_job(db, t.id, receiver.url(path))
    run_to_end(db, job)
    [row] = _settled(db, job["id"])
    first, second = receiver.at(path)
    assert row["status"] == "delivered" and second.at - first.at >= 2.0 > SCHEDULE[0] * (1 + JITTER)


def test_dead_lettered_after_the_last_attempt(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    receiver.script(path, *[(500, {})] * (len(SCHEDULE) + 1))
    job = new_job(db, t.id, receiver.url(path))
    run_to_end(db, job)
    [row] = wait_until(lambda: [d for d in deliveries(db, job["id"]) if d["status"] == "dead"], timeout=30,
                       what="dead letter")
    assert row["attempts"] == len(SCHEDULE) + 1 and len(receiver.at(path)) == len(SCHEDULE) + 1
    assert row["last_status_code"] == 500 and row["last_error"].startswith(f"gave up after attempt {len(SCHEDULE) + 1}")


def test_410_disables_the_endpoint_for_that_tenant(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    receiver.script(path, (410, {}))
    first = new_job(db, t.id, receiver.url(path))
    run_to_end(db, first)
    [row] = _settled(db, first["id"])
    assert row["status"] == "dead" and row["attempts"] == 1 and row["last_status_code"] == 410
    [endpoint] = webhooks.disabled_endpoints(db, t.id)
    assert endpoint["url"] == receiver.url(path) and "410" in endpoint["disabled_reason"]
    second = new_job(db, t.id, receiver.url(path))
    run_to_end(db, second)
    [skipped] = _settled(db, second["id"])
    assert skipped["status"] == "dead" and "disabled" in skipped["last_error"]
    assert len(receiver.at(path)) == 1  # nothing more was sent
    # Another tenant using the same URL is not affected.
    other, _ = tenants.create_tenant(db, f"other-{uuid.uuid4().hex[:6]}")
    theirs = new_job(db, other.id, receiver.url(path))
    run_to_end(db, theirs)
    assert _settled(db, theirs["id"])[0]["status"] == "delivered"


def test_a_lost_dispatch_and_a_lost_attempt_are_recovered(db, tenant, receiver):
    """A dispatcher that leased a row and died, and a worker that died mid-attempt: both are picked up
    again once their lease runs out, under the same webhook-id."""
    t, _ = tenant
    path = _path()
    leased, lost = new_job(db, t.id, receiver.url(path)), new_job(db, t.id, receiver.url(path))
    with db.connection() as conn, conn.transaction():
        for job in (leased, lost):
            conn.execute("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (job["id"],))
        conn.execute("UPDATE webhook_deliveries SET lease_until = now() + interval '1.5 s' WHERE job_id = %s",
                     (leased["id"],))
        conn.execute("""UPDATE webhook_deliveries SET attempts = 1, lease_until = now() + interval '1.5 s'
                         WHERE job_id = %s""", (lost["id"],))
        conn.execute("""INSERT INTO webhook_attempts (delivery_id, attempt, error)
                        SELECT id, 1, %s FROM webhook_deliveries WHERE job_id = %s""",
                     (webhooks.LOST_ATTEMPT, lost["id"]))
    started = time.monotonic()
    receiver.wait(lambda rs: len([r for r in rs if r.path == path]) == 2)
    assert time.monotonic() - started >= 1.0  # not before the leases ran out
    [a], [b] = _settled(db, leased["id"]), _settled(db, lost["id"])
    assert (a["status"], a["attempts"]) == ("delivered", 1)
    assert (b["status"], b["attempts"]) == ("delivered", 2)
    assert [x["error"] for x in attempts(db, b["id"])] == [webhooks.LOST_ATTEMPT, None]
    assert {r.id for r in receiver.at(path)} == {str(a["id"]), str(b["id"])}


def test_real_deliveries_fail_verification_when_tampered_stale_or_under_the_wrong_secret(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    job = new_job(db, t.id, receiver.url(path))
    run_to_end(db, job)
    receiver.wait(lambda rs: any(r.path == path for r in rs))
    [got] = receiver.at(path)
    secret = webhooks.current_secret(db, t.id)["secret"]
    assert Webhook(secret).verify(got.body, got.headers)["data"]["id"] == str(job["id"])
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(got.body.replace(b'"succeeded"', b'"failed"'), got.headers)
    stale = {**got.headers, **signing.headers([secret], got.id, int(time.time()) - 600, got.body)}
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(got.body, stale)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(got.body, got.headers)
    other, _ = tenants.create_tenant(db, f"other-{uuid.uuid4().hex[:6]}")
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.current_secret(db, other.id)["secret"]).verify(got.body, got.headers)


def test_rotation_signs_with_both_secrets_during_the_overlap(db, tenant, receiver):
    t, _ = tenant
    path = _path()
    old = webhooks.current_secret(db, t.id)["secret"]
    new = webhooks.rotate_secret(db, t.id, overlap_seconds=3600)["secret"]
    run_to_end(db, new_job(db, t.id, receiver.url(path)))
    receiver.wait(lambda rs: any(r.path == path for r in rs))
    [got] = receiver.at(path)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(got.body, got.headers)
    Webhook(new).verify(got.body, got.headers)
    newest = webhooks.rotate_secret(db, t.id, overlap_seconds=0)["secret"]  # no overlap: the new one only
    run_to_end(db, new_job(db, t.id, receiver.url(path)))
    receiver.wait(lambda rs: len([r for r in rs if r.path == path]) == 2)
    latest = receiver.at(path)[1]
    assert len(latest.headers["webhook-signature"].split(" ")) == 2  # `new` (rotated out, 0 s) is gone; `old` stays
    Webhook(newest).verify(latest.body, latest.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(latest.body, latest.headers)


def test_ssrf_guard_at_delivery_time(db, tenant, receiver, canary):
    """URLs that got past submission (inserted directly, as if DNS had changed since) are refused before
    any connection, and a redirect to an internal address is not followed: the canary hears nothing."""
    t, _ = tenant
    jobs = [new_job(db, t.id, url) for url in internal_urls(canary.port)]
    redirect = _path()
    receiver.script(redirect, (302, {"Location": canary.url("/from-redirect")}),
                    (307, {"Location": "http://169.254.169.254/latest/meta-data/"}))
    redirected = new_job(db, t.id, receiver.url(redirect))
    for job in [*jobs, redirected]:
        run_to_end(db, job)
    for job in jobs:
        [row] = _settled(db, job["id"])
        assert row["status"] == "dead" and row["attempts"] == 1, row
        assert row["last_error"].startswith("refused:") and row["last_status_code"] is None, row
    receiver.wait(lambda rs: len([r for r in rs if r.path == redirect]) == 3)
    [row] = _settled(db, redirected["id"])
    assert [a["status_code"] for a in attempts(db, row["id"])] == [302, 307, 200]
    canary_silent(canary)


def test_jobs_without_a_webhook_make_no_deliveries(db, tenant):
    t, _ = tenant
    job = new_job(db, t.id, None)
    run_to_end(db, job)
    assert deliveries(db, job["id"]) == []


def test_webhooks_workers_consume_only_the_webhooks_queue(webhook_settings, webhook_workers):
    from tasks.celery_app import create_celery

    queues = create_celery(webhook_settings).control.inspect(timeout=2).active_queues()
    assert {name: [q["name"] for q in qs] for name, qs in queues.items()} == \
        {f"webhooks@test-{i}": ["webhooks"] for i in range(len(webhook_workers.procs))}


def test_an_internal_error_uses_up_an_attempt_instead_of_looping(db, tenant, receiver, webhook_settings, monkeypatch):
    from tasks.webhooks import task as delivery

    t, _ = tenant
    path = _path()
    job = new_job(db, t.id, receiver.url(path))
    with db.connection() as conn, conn.transaction():  # leased: the real dispatchers leave it to this test
        conn.execute("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (job["id"],))
        conn.execute("UPDATE webhook_deliveries SET lease_until = now() + interval '1 h' WHERE job_id = %s",
                     (job["id"],))
    [row] = deliveries(db, job["id"])

    def broken(*args):
        raise KeyError("bug")

    monkeypatch.setattr(delivery, "send", broken)
    assert delivery.deliver(db, webhook_settings, str(row["id"]), 1) == "pending"
    [row] = _settled(db, job["id"])  # attempt 2 by a real worker
    assert row["status"] == "delivered" and row["attempts"] == 2
    assert attempts(db, row["id"])[0]["error"] == "internal error: KeyError('bug')"
    assert [r.id for r in receiver.at(path)] == [str(row["id"])]


def test_job_dead_event_whatever_code_path_sets_it(db, tenant, receiver):
    """`dead` is set by the delivery-guarantees code (another branch): any UPDATE of the status makes
    the event, here a plain SQL one."""
    t, _ = tenant
    path = _path()
    job = new_job(db, t.id, receiver.url(path))
    with db.connection() as conn:
        conn.execute("""UPDATE jobs SET status = 'dead', finished_at = now(),
                               error = '{"type": "exhausted", "message": "gave up"}' WHERE id = %s""", (job["id"],))
    receiver.wait(lambda rs: any(r.path == path for r in rs))
    [got] = receiver.at(path)
    assert got.event["type"] == "job.dead" and got.event["data"]["error"]["type"] == "exhausted"
