"""The Batch API in-process (Flask test client) over real Postgres and Redis, with no router: the limits
on a batch input file, the tenant's caps applied to a batch's lines as a whole, and what a batch's
creation writes (its jobs, all of them or none, and their place in the fair queue)."""

from __future__ import annotations

import io
import json
import uuid

import pytest

from api import create_app
from tasks.jobs import tenants
from tasks.routing import fair_queue
from tests.support import auth, job_count


@pytest.fixture(scope="module")
def small(api_settings):
    """An API whose batch files may hold 2048 bytes and 3 requests."""
    return create_app(api_settings.model_copy(update={"batch_max_file_bytes": 2048, "batch_max_lines": 3}))


def _lines(n: int, model: str, **body) -> bytes:
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": model, "prompt": f"p{i}", "max_tokens": 4, **body}}) + "\n"
                   for i in range(n)).encode()


def _upload(client, key: str, content: bytes):
    return client.post("/v1/files", headers=auth(key), content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")})


def test_file_limits_are_clear_errors_and_store_nothing(small, db, api_settings):
    client = small.test_client()
    tenant, key = tenants.create_tenant(db, f"files-{uuid.uuid4().hex[:6]}")
    model = api_settings.model_name
    big = _upload(client, key, _lines(2, model, prompt="x" * 3000))
    assert big.status_code == 413 and big.get_json()["error"]["code"] == "file_too_large"
    many = _upload(client, key, _lines(4, model))
    assert many.status_code == 400 and "holds 4 requests; a batch may hold at most 3" in many.get_json()["error"]["message"]
    assert _upload(client, key, b"").status_code == 400
    assert client.get("/v1/files", headers=auth(key)).get_json()["data"] == []
    ok = _upload(client, key, _lines(3, model))
    assert ok.status_code == 200 and ok.get_json()["bytes"] == len(_lines(3, model))
    assert client.get(f"/v1/files/{ok.get_json()['id']}/content", headers=auth(key)).data == _lines(3, model)
    assert client.get("/v1/files/not-a-file", headers=auth(key)).status_code == 404


def test_a_batch_past_the_tenants_caps_fails_whole_and_runs_nothing(app, db, api_settings, api_redis):
    client = app.test_client()
    tenant, key = tenants.create_tenant(db, f"capped-{uuid.uuid4().hex[:6]}")
    tenants.set_limits(db, tenant.name, {"max_active_jobs": 4})
    file_id = _upload(client, key, _lines(5, api_settings.model_name)).get_json()["id"]
    batch = client.post("/v1/batches", headers=auth(key), json={
        "input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}).get_json()
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "active_jobs_limit_exceeded"
    assert job_count(db, tenant.id) == 0


def test_a_batch_becomes_its_jobs_in_the_fair_queue_at_once(app, db, api_settings, api_redis):
    client = app.test_client()
    tenant, key = tenants.create_tenant(db, f"lines-{uuid.uuid4().hex[:6]}")
    file_id = _upload(client, key, _lines(3, api_settings.model_name)).get_json()["id"]
    answer = client.post("/v1/batches", headers=auth(key), json={
        "input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h",
        "metadata": {"k": "v"}})
    batch = answer.get_json()
    assert answer.status_code == 200 and batch["status"] == "in_progress" and batch["metadata"] == {"k": "v"}
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    with db.connection() as conn:
        jobs = conn.execute("SELECT id::text, status, priority, custom_id, batch_line, request FROM jobs "
                            "WHERE tenant_id = %s ORDER BY batch_line", (tenant.id,)).fetchall()
    assert [(j["status"], j["priority"], j["custom_id"], j["batch_line"]) for j in jobs] == [
        ("queued", "batch", f"r{i}", i + 1) for i in range(3)]
    assert jobs[0]["request"]["max_tokens"] == 4 and jobs[0]["request"]["prompt_tokens"] > 0
    # No route messages: the lines wait in the fair queue's batch class, in one push.
    assert fair_queue.pending(api_redis, [j["id"] for j in jobs]) == {j["id"] for j in jobs}
    depth = fair_queue.depth(api_redis, api_settings.model_name)
    assert depth["batch"] == {str(tenant.id): 3} and str(tenant.id) not in depth["interactive"]
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(key)).get_json()
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"] >= cancelled["created_at"]
    listed = client.get("/v1/batches?limit=1", headers=auth(key)).get_json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]] and listed["has_more"] is False
