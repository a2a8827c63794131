"""The webhook API: a job's `webhook` at submit (SSRF refused with 422), the tenant's secret, a job's
deliveries and manual re-sends, and re-enabling an endpoint disabled by a 410."""

from __future__ import annotations

import uuid

import pytest
from standardwebhooks import Webhook

from tasks.jobs import store, tenants
from tests.support import auth, job_count
from tests.receiver import canary_silent, internal_urls
from tests.system.webhooks.support import run_to_end, wait_until

PROMPT = {"prompt": "Say hi", "max_tokens": 4}


def _submit(client, key, webhook) -> tuple[int, dict]:
    response = client.post("/v1/jobs", json={**PROMPT, "webhook": webhook}, headers=auth(key))
    return response.status_code, response.get_json()


def test_internal_webhook_urls_are_refused_at_submit(db, client, tenant, canary):
    t, key = tenant
    before = job_count(db, t.id)
    for url in internal_urls(canary.port):
        status, body = _submit(client, key, {"url": url})
        assert status == 422, (url, body)
        assert body["errors"][0]["field"] == "webhook.url", body
        assert any(word in body["detail"] for word in ("address", "scheme", "host")), body
    assert job_count(db, t.id) == before
    canary_silent(canary)


@pytest.mark.parametrize("webhook, field", [
    ({"url": "http://8.8.8.8/", "events": ["job.queued"]}, "webhook.events.0"),
    ({"url": "http://8.8.8.8/", "events": []}, "webhook.events"),
    ({"url": "http://8.8.8.8/", "secret": "x"}, "webhook.secret"),
    ({"events": ["job.succeeded"]}, "webhook.url"),
    ({"url": "http://no-such-host.invalid/"}, "webhook.url"),
])
def test_malformed_webhooks_are_refused_at_submit(client, tenant, webhook, field):
    _, key = tenant
    status, body = _submit(client, key, webhook)
    assert status == 422 and body["errors"][0]["field"] == field, body


def test_a_public_url_is_accepted_with_the_default_events(client, tenant):
    _, key = tenant
    status, body = _submit(client, key, {"url": "https://8.8.8.8/hooks", "events": ["job.succeeded"] * 2})
    assert status == 202 and body["webhook"] == {"url": "https://8.8.8.8/hooks", "events": ["job.succeeded"]}
    status, body = _submit(client, key, {"url": "https://8.8.8.8/hooks"})
    assert body["webhook"]["events"] == ["job.succeeded", "job.failed", "job.cancelled", "job.dead"]


def test_secret_read_and_rotate(client, tenant):
    _, key = tenant
    first = client.get("/v1/webhooks/secret", headers=auth(key)).get_json()
    assert first["secret"].startswith("whsec_") and first["previous"] == []
    assert client.get("/v1/webhooks/secret", headers=auth(key)).get_json()["secret"] == first["secret"]
    rotated = client.post("/v1/webhooks/secret/rotate", json={"overlap_seconds": 600}, headers=auth(key)).get_json()
    assert rotated["secret"] != first["secret"] and len(rotated["previous"]) == 1
    assert client.post("/v1/webhooks/secret/rotate", headers=auth(key)).status_code == 200  # default overlap
    bad = client.post("/v1/webhooks/secret/rotate", json={"overlap_seconds": -1}, headers=auth(key))
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "overlap_seconds"
    assert client.get("/v1/webhooks/secret").status_code == 401


@pytest.mark.usefixtures("webhook_workers")
def test_payload_is_the_job_resource_plus_the_event_type(db, client, tenant, receiver):
    t, key = tenant
    path = f"/api/{uuid.uuid4().hex[:8]}"
    status, job = _submit(client, key, {"url": receiver.url(path), "events": ["job.running", "job.succeeded"]})
    assert status == 202
    row = store.get_job(db, job["id"])
    run_to_end(db, row)
    receiver.wait(lambda rs: len([r for r in rs if r.path == path]) == 2)
    secret = client.get("/v1/webhooks/secret", headers=auth(key)).get_json()["secret"]
    # Events are not ordered (two workers may send them at once): tell them apart by type.
    events = {e["type"]: e for e in (Webhook(secret).verify(r.body, r.headers) for r in receiver.at(path))}
    running, succeeded = events["job.running"], events["job.succeeded"]
    assert set(succeeded) == {"type", "timestamp", "data"} and succeeded["type"] == "job.succeeded"
    assert succeeded["data"] == client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).get_json()
    assert running["type"] == "job.running" and running["data"]["status"] == "running"
    assert running["data"]["finished_at"] is None and running["data"]["result"] is None

    listed = wait_until(lambda: (d := client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth(key)).get_json())
                        and all(x["status"] == "delivered" for x in d["data"]) and d, what="delivered")
    assert [d["event"] for d in listed["data"]] == ["job.running", "job.succeeded"]
    received = {r.event["type"]: r.id for r in receiver.at(path)}
    for delivery in listed["data"]:
        assert delivery["id"] == received[delivery["event"]] and delivery["attempt_count"] == 1
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] == 200 and attempt["latency_ms"] > 0 and attempt["started_at"]
        assert attempt["error"] is None


@pytest.mark.usefixtures("webhook_workers")
def test_retry_and_re_enable(db, client, tenant, receiver):
    t, key = tenant
    path = f"/api/{uuid.uuid4().hex[:8]}"
    receiver.script(path, (410, {}))
    status, job = _submit(client, key, {"url": receiver.url(path)})
    run_to_end(db, store.get_job(db, job["id"]))
    deliveries_url = f"/v1/jobs/{job['id']}/deliveries"
    [dead] = wait_until(lambda: [d for d in client.get(deliveries_url, headers=auth(key)).get_json()["data"]
                                 if d["status"] == "dead"], what="410 dead letter")
    assert dead["last_status_code"] == 410
    retry_url = f"{deliveries_url}/{dead['id']}/retry"
    refused = client.post(retry_url, headers=auth(key))
    assert refused.status_code == 409 and "re-enable" in refused.get_json()["detail"]

    [endpoint] = client.get("/v1/webhooks/endpoints", headers=auth(key)).get_json()["data"]
    assert endpoint["url"] == receiver.url(path) and endpoint["disabled"]
    assert client.post("/v1/webhooks/endpoints/enable", json={"url": "http://8.8.8.8/"},
                       headers=auth(key)).status_code == 404
    enabled = client.post("/v1/webhooks/endpoints/enable", json={"url": receiver.url(path)}, headers=auth(key))
    assert enabled.status_code == 200
    assert client.get("/v1/webhooks/endpoints", headers=auth(key)).get_json()["data"] == []

    again = client.post(retry_url, headers=auth(key))
    assert again.status_code == 202 and again.get_json()["status"] == "pending"
    receiver.wait(lambda rs: len([r for r in rs if r.path == path]) == 2)
    assert {r.id for r in receiver.at(path)} == {dead["id"]}  # the same webhook-id
    [done] = wait_until(lambda: [d for d in client.get(deliveries_url, headers=auth(key)).get_json()["data"]
                                 if d["status"] == "delivered"], what="re-sent")
    assert [a["status_code"] for a in done["attempts"]] == [410, 200]

    other_t, other_key = tenants.create_tenant(db, f"other-{uuid.uuid4().hex[:6]}")
    assert client.get(deliveries_url, headers=auth(other_key)).status_code == 404
    assert client.post(retry_url, headers=auth(other_key)).status_code == 404
    assert client.post(f"{deliveries_url}/{uuid.uuid4()}/retry", headers=auth(key)).status_code == 404


@pytest.mark.usefixtures("webhook_workers")
def test_tenant_wide_listing_shows_dead_letters(db, client, tenant, receiver):
    t, key = tenant
    path = f"/api/{uuid.uuid4().hex[:8]}"
    receiver.script(path, (410, {}))
    ok_job, gone_job = (store.get_job(db, _submit(client, key, {"url": receiver.url(p)})[1]["id"])
                        for p in (f"{path}-ok", path))
    run_to_end(db, ok_job)
    run_to_end(db, gone_job)
    dead = wait_until(lambda: client.get("/v1/webhooks/deliveries?status=dead", headers=auth(key)).get_json()["data"],
                      what="a dead letter")
    assert [d["job_id"] for d in dead] == [str(gone_job["id"])] and dead[0]["attempts"][0]["status_code"] == 410
    wait_until(lambda: len(client.get("/v1/webhooks/deliveries?status=delivered", headers=auth(key))
                           .get_json()["data"]) == 1, what="the other delivered")
    first = client.get("/v1/webhooks/deliveries?limit=1", headers=auth(key)).get_json()
    second = client.get(f"/v1/webhooks/deliveries?limit=1&cursor={first['next_cursor']}", headers=auth(key)).get_json()
    assert len(first["data"]) == len(second["data"]) == 1 and second["next_cursor"] is None
    assert {first["data"][0]["id"], second["data"][0]["id"]} == {d["id"] for d in
                                                                 client.get("/v1/webhooks/deliveries",
                                                                            headers=auth(key)).get_json()["data"]}
    assert client.get("/v1/webhooks/deliveries?status=lost", headers=auth(key)).status_code == 400
