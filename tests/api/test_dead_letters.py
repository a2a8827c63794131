"""The API side of delivery guarantees and routing: idempotency keys, dead letters, nodes and drain,
and the model check, in-process over real Postgres and Redis."""

from __future__ import annotations

from tasks.jobs import store, tenants
from tasks.routing import registry
from tests.api.support import queued_messages
from tests.support import auth

PROMPT = {"prompt": "hello", "max_tokens": 4}


def test_idempotency_key_replays_the_original_job(client, api_redis, tenant):
    _, key = tenant
    headers = {**auth(key), "Idempotency-Key": "k-1"}
    first = client.post("/v1/jobs", json=PROMPT, headers=headers)
    again = client.post("/v1/jobs", json=PROMPT, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert queued_messages(api_redis) == 1  # published once
    conflict = client.post("/v1/jobs", json={**PROMPT, "max_tokens": 5}, headers=headers)
    assert conflict.status_code == 422 and conflict.get_json()["errors"][0]["field"] == "Idempotency-Key"
    bad = client.post("/v1/jobs", json=PROMPT, headers={**auth(key), "Idempotency-Key": "x" * 300})
    assert bad.status_code == 400 and "255" in bad.get_json()["detail"]


def test_max_attempts_and_session_are_validated_and_shown(client, api_redis, tenant):
    _, key = tenant
    assert client.post("/v1/jobs", json={**PROMPT, "max_attempts": 0}, headers=auth(key)).status_code == 422
    job = client.post("/v1/jobs", json={**PROMPT, "max_attempts": 5,
                                        "routing": {"strategy": "prefix_affinity", "session_id": "chat-9"}},
                      headers=auth(key)).get_json()
    assert job["max_attempts"] == 5 and job["routing"] == {"strategy": "prefix_affinity", "session_id": "chat-9"}


def test_unknown_model_is_refused_at_submit(client, api_redis, tenant):
    _, key = tenant
    response = client.post("/v1/jobs", json={**PROMPT, "model": "gpt-17"}, headers=auth(key))
    assert response.status_code == 422 and "no worker serves model 'gpt-17'" in response.get_json()["detail"]
    registry.heartbeat(api_redis, {"id": "n-x", "models": ["gpt-17"], "engine_state": "ready"}, ttl=30)
    assert client.post("/v1/jobs", json={**PROMPT, "model": "gpt-17"}, headers=auth(key)).status_code == 202


def test_dead_letters_are_listed_per_tenant_and_replayed(client, api_redis, db, tenant):
    t, key = tenant
    admin_key = tenants.create_tenant(db, "admin-" + t.name, admin=True)[1]
    other_key = tenants.create_tenant(db, "other-" + t.name)[1]
    job = client.post("/v1/jobs", json={**PROMPT, "max_attempts": 1}, headers=auth(key)).get_json()
    store.mark_routed(db, job["id"], 1, "n1")
    store.start_jobs(db, [(job["id"], 1)], "n1")
    assert store.retry_job(db, job["id"], 1, {"type": "worker_lost", "message": "node n1 died"})["status"] == "dead"

    mine = client.get("/v1/dead-letters", headers=auth(key)).get_json()["data"]
    assert [(d["job_id"], d["reason"], d["attempts"]) for d in mine] == [(job["id"], "worker_lost", 1)]
    assert client.get("/v1/dead-letters", headers=auth(other_key)).get_json()["data"] == []
    assert job["id"] in {d["job_id"] for d in client.get("/v1/dead-letters", headers=auth(admin_key)).get_json()["data"]}
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).get_json()["status"] == "dead"

    assert client.post(f"/v1/dead-letters/{mine[0]['id']}/replay", headers=auth(other_key)).status_code == 404
    before = queued_messages(api_redis)
    replay = client.post(f"/v1/dead-letters/{mine[0]['id']}/replay", headers=auth(key))
    assert replay.status_code == 202 and replay.get_json()["attempt"] == 2
    assert queued_messages(api_redis) == before + 1
    again = client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).get_json()
    assert (again["status"], again["attempt"], again["max_attempts"]) == ("queued", 2, 2)
    assert client.post(f"/v1/dead-letters/{mine[0]['id']}/replay", headers=auth(key)).status_code == 404


def test_nodes_are_shown_in_full_and_drained_by_admins_only(client, api_redis, db, tenant):
    t, key = tenant
    admin_key = tenants.create_tenant(db, "ops-" + t.name, admin=True)[1]
    registry.heartbeat(api_redis, {"id": "gpu-7", "models": ["m"], "engine_state": "ready", "inflight": 2,
                                   "ewma_job_seconds": 1.5}, ttl=30)
    nodes = {n["id"]: n for n in client.get("/v1/nodes", headers=auth(key)).get_json()["data"]}
    # A tenant sees what a node serves, not its load, latencies or host: those are for admins.
    assert nodes["gpu-7"] == {"object": "node", "id": "gpu-7", "models": ["m"], "supports_seed": None, "routable": True}
    full = {n["id"]: n for n in client.get("/v1/nodes", headers=auth(admin_key)).get_json()["data"]}
    assert full["gpu-7"]["inflight"] == 2 and full["gpu-7"]["ewma_job_seconds"] == 1.5

    assert client.post("/v1/nodes/gpu-7/drain", headers=auth(key)).status_code == 403
    assert client.post("/v1/nodes/nope/drain", headers=auth(admin_key)).status_code == 404
    drained = client.post("/v1/nodes/gpu-7/drain", headers=auth(admin_key)).get_json()
    assert drained["draining"] and not drained["routable"]
    assert not registry.routable(next(n for n in registry.live_nodes(api_redis) if n["id"] == "gpu-7"))
    assert client.delete("/v1/nodes/gpu-7/drain", headers=auth(admin_key)).get_json()["routable"]


def test_a_cooling_node_is_out_of_rotation_until_a_success(api_redis):
    registry.heartbeat(api_redis, {"id": "gpu-8", "models": ["m"], "engine_state": "ready"}, ttl=30)
    assert registry.record_failure(api_redis, "gpu-8", base=2, cap=60) == 2
    assert registry.record_failure(api_redis, "gpu-8", base=2, cap=60) == 4  # exponential back-off
    node = next(n for n in registry.live_nodes(api_redis) if n["id"] == "gpu-8")
    assert node["cooldown_s"] > 0 and not registry.routable(node)
    registry.record_success(api_redis, "gpu-8")
    assert registry.routable(next(n for n in registry.live_nodes(api_redis) if n["id"] == "gpu-8"))
    registry.heartbeat(api_redis, {"id": "gpu-8", "models": ["m"], "engine_state": "dead"}, ttl=30)
    assert not registry.routable(next(n for n in registry.live_nodes(api_redis) if n["id"] == "gpu-8"))


def test_replay_cli_requeues_dead_letters_in_bulk(api_settings, api_redis, db, tenant):
    import os
    import subprocess
    import sys

    t, key = tenant
    job, _ = store.insert_job(db, tenant_id=t.id, model="m", strategy="round_robin",
                              request={"prompt": "x", "max_attempts": 1}, metadata={}, max_attempts=1)
    store.mark_routed(db, job["id"], 1, "n1")
    store.start_jobs(db, [(job["id"], 1)], "n1")
    store.retry_job(db, job["id"], 1, {"type": "engine_dead", "message": "boom"})
    env = {**os.environ, "DATABASE_URL": api_settings.database_url, "REDIS_URL": api_settings.redis_url}
    out = subprocess.run([sys.executable, "-m", "ops.admin", "replay-dead-letters", "--reason", "engine_dead"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert f"job {job['id']} re-queued as attempt 2" in out
    assert store.get_job(db, job["id"])["status"] == "queued" and queued_messages(api_redis) >= 1
