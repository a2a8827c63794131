"""API keys, tenant isolation, listing, cancelling and long-polling, over real Postgres and Redis."""

from __future__ import annotations

import threading
import time
import uuid

from tasks.jobs import notify, store, tenants
from tasks.jobs.status import JobStatus
from tests.support import auth


def _submit(client, key, **extra):
    response = client.post("/v1/jobs", json={"prompt": "hello", "max_tokens": 4, **extra}, headers=auth(key))
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def test_missing_or_wrong_key_is_401(client):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401
        assert response.mimetype == "application/problem+json"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_api_keys_are_stored_hashed(db, tenant):
    _, key = tenant
    with db.connection() as conn:
        stored = [bytes(r["key_hash"]) for r in conn.execute("SELECT key_hash FROM api_keys").fetchall()]
    assert tenants.hash_api_key(key) in stored
    assert all(key.encode() not in h for h in stored)


def test_other_tenants_job_is_404_like_a_missing_one(client, api_redis, db):
    _, key_a = tenants.create_tenant(db, "iso-a")
    _, key_b = tenants.create_tenant(db, "iso-b")
    job = _submit(client, key_a)

    theirs = client.get(f"/v1/jobs/{job['id']}", headers=auth(key_b))
    missing = client.get("/v1/jobs/00000000-0000-4000-8000-000000000000", headers=auth(key_b))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.get_json()["title"] == missing.get_json()["title"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key_b)).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}?wait=1", headers=auth(key_b)).status_code == 404
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(key_b)).get_json()["data"]] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(key_a)).get_json()["data"]] == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(key_a)).get_json()["status"] == "queued"


def test_list_paginates_with_a_cursor_and_filters_by_status(client, api_redis, tenant):
    _, key = tenant
    ids = [_submit(client, key)["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(key))
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else ""), headers=auth(key)).get_json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    cancelled = client.get("/v1/jobs?status=cancelled", headers=auth(key)).get_json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    for query, word in (("status=nope", "status"), ("limit=0", "limit"), ("cursor=zzz", "cursor")):
        response = client.get(f"/v1/jobs?{query}", headers=auth(key))
        assert response.status_code == 400 and word in response.get_json()["detail"]


def test_cancel_a_queued_job_then_cancel_again_is_409(client, api_redis, tenant):
    _, key = tenant
    job = _submit(client, key)
    first = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key))
    assert first.status_code == 200 and first.get_json()["status"] == "cancelled"
    assert first.get_json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key))
    assert again.status_code == 409 and "already cancelled" in again.get_json()["detail"]


def test_long_poll_wakes_on_the_notification(client, api_redis, db, tenant, api_settings):
    """The waiting request returns as soon as the job finishes, well before its `wait` runs out."""
    _, key = tenant
    job = _submit(client, key)

    def finish_later():
        time.sleep(1.0)
        assert store.mark_routed(db, job["id"], 1, "n1")
        assert store.start_jobs(db, [(job["id"], 1)], "n1")
        assert store.finish_job(db, job["id"], 1, JobStatus.SUCCEEDED, node_id="n1", result={"text": "ok"})
        notify.job_finished(api_redis, job["id"])

    threading.Thread(target=finish_later).start()
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job['id']}?wait=20", headers=auth(key))
    elapsed = time.monotonic() - started
    assert response.get_json()["status"] == "succeeded"
    assert 0.9 < elapsed < 2.0, elapsed


def test_long_poll_times_out_with_the_current_state(client, api_redis, tenant):
    _, key = tenant
    job = _submit(client, key)
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job['id']}?wait=1", headers=auth(key))
    assert 0.9 < time.monotonic() - started < 3
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    for bad in ("61", "-1", "soon"):
        assert client.get(f"/v1/jobs/{job['id']}?wait={bad}", headers=auth(key)).status_code == 400


def test_healthz_is_up_and_readyz_needs_a_worker(client, api_redis):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.get_json()["checks"]
    assert checks["redis"] == "ok" and checks["postgres"] == "ok" and checks["workers"] == "no live worker"


def test_prefer_wait_answers_a_submit_with_the_finished_job(client, api_redis, db, tenant):
    """`Prefer: wait=N` on POST /v1/jobs: 200 with the finished job when it ends within N seconds,
    otherwise 202 with the job as it is, as without the header; a malformed preference is ignored."""
    _, key = tenant
    finishing: list = []
    prompt = f"prefer {uuid.uuid4()}"

    def finish_when_submitted():
        job_id = _wait_for_queued_job(db, prompt)
        time.sleep(0.5)
        assert store.mark_routed(db, job_id, 1, "n1") and store.start_jobs(db, [(job_id, 1)], "n1")
        assert store.finish_job(db, job_id, 1, JobStatus.SUCCEEDED, node_id="n1", result={"text": "ok"})
        notify.job_finished(api_redis, job_id)
        finishing.append(job_id)

    worker = threading.Thread(target=finish_when_submitted)
    worker.start()
    started = time.monotonic()
    response = client.post("/v1/jobs", json={"prompt": prompt, "max_tokens": 4},
                           headers={**auth(key), "Prefer": "wait=20"})
    worker.join()
    assert response.status_code == 200 and response.get_json()["status"] == "succeeded"
    assert response.headers["Preference-Applied"] == "wait=20" and response.headers["Location"]
    assert 0.4 < time.monotonic() - started < 3

    started = time.monotonic()
    slow = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers={**auth(key), "Prefer": "wait=1"})
    assert slow.status_code == 202 and slow.get_json()["status"] == "queued"
    assert 0.9 < time.monotonic() - started < 3
    odd = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers={**auth(key), "Prefer": "wait=soon"})
    assert odd.status_code == 202 and "Preference-Applied" not in odd.headers


def _wait_for_queued_job(db, prompt: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.connection() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE status = 'queued' AND request ->> 'prompt' = %s",
                               (prompt,)).fetchone()
        if row:
            return row["id"]
        time.sleep(0.05)
    raise AssertionError("no job was submitted")


def test_readyz_says_what_is_down_without_the_exception_text(base_settings):
    from api import create_app

    down = base_settings.model_copy(update={"database_url": "postgresql://nobody@127.0.0.1:1/none",
                                            "redis_url": "redis://127.0.0.1:1/0"})
    ready = create_app(down).test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"] == {"redis": "unreachable", "workers": "unknown (redis unreachable)",
                                          "postgres": "unreachable"}
