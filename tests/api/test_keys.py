"""Key lifecycle: several live keys per tenant, scopes, expiry, rotation with an overlap, revocation
refused within a second, and every change in the audit log."""

from __future__ import annotations

import time

import pytest

from tasks.jobs import tenants
from tests.support import auth

JOB = {"prompt": "hi", "max_tokens": 4}


def _audit(db, tenant_id) -> list[str]:
    with db.connection() as conn:
        return [r["action"] for r in conn.execute("SELECT action FROM audit_log WHERE tenant_id = %s ORDER BY id",
                                                   (tenant_id,)).fetchall()]


def test_scopes_expiry_rotation_and_revocation(client, api_redis, db, tenant):
    t, first = tenant
    _, reader = tenants.create_key(db, t.name, scopes=["jobs:read"], name="dashboard")
    job = client.post("/v1/jobs", json=JOB, headers=auth(first)).get_json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(reader)).status_code == 200
    denied = client.post("/v1/jobs", json=JOB, headers=auth(reader))
    assert denied.status_code == 403 and "`jobs:write` scope" in denied.get_json()["detail"]
    assert client.get("/v1/webhooks/secret", headers=auth(reader)).status_code == 403
    assert client.post("/v1/nodes/x/drain", headers=auth(first)).status_code == 403  # no admin scope

    _, brief = tenants.create_key(db, t.name, expires_in=0.5)
    assert client.get("/v1/jobs", headers=auth(brief)).status_code == 200
    time.sleep(1.6)  # expired, and past the API's one-second memory of keys
    assert client.get("/v1/jobs", headers=auth(brief)).status_code == 401

    new, rotated = tenants.rotate_key(db, first[:10], overlap=0.5)
    assert sorted(new["scopes"]) == ["jobs:read", "jobs:write", "webhooks"]
    assert client.post("/v1/jobs", json=JOB, headers=auth(rotated)).status_code == 202
    time.sleep(1.6)
    assert client.get("/v1/jobs", headers=auth(first)).status_code == 401  # the old key's overlap is over

    tenants.revoke_key(db, str(new["id"]))
    time.sleep(1.1)
    assert client.get("/v1/jobs", headers=auth(rotated)).status_code == 401
    assert [k["revoked_at"] is not None for k in tenants.list_keys(db, t.name)] == [False, False, False, True]
    assert _audit(db, t.id) == ["tenant.created", "key.created", "key.created", "key.rotated", "key.revoked"]
    with pytest.raises(ValueError, match="scopes must be"):
        tenants.create_key(db, t.name, scopes=["root"])


def test_the_admin_api_sets_limits_and_manages_keys_for_admin_keys_only(client, api_redis, db, tenant):
    t, key = tenant
    _, admin_key = tenants.create_tenant(db, "ops-" + t.name, admin=True)
    assert client.put(f"/v1/admin/tenants/{t.name}/limits", json={"submit_rate": 5}, headers=auth(key)).status_code == 403
    limits = client.put(f"/v1/admin/tenants/{t.name}/limits", json={"submit_rate": 5, "max_waits": 10},
                        headers=auth(admin_key))
    assert limits.status_code == 200 and limits.get_json()["limits"] == {"submit_rate": 5, "max_waits": 10}
    bad = client.put(f"/v1/admin/tenants/{t.name}/limits", json={"max_waits": 2.5}, headers=auth(admin_key))
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "max_waits"
    assert client.put("/v1/admin/tenants/nobody/limits", json={"max_waits": 2}, headers=auth(admin_key)).status_code == 404

    made = client.post(f"/v1/admin/tenants/{t.name}/keys", json={"scopes": ["jobs:read"], "name": "ro"},
                       headers=auth(admin_key))
    assert made.status_code == 201 and made.get_json()["key"].startswith("sy_")
    listed = client.get(f"/v1/admin/tenants/{t.name}/keys", headers=auth(admin_key)).get_json()["data"]
    assert [k["name"] for k in listed] == ["first key", "ro"] and "key" not in listed[1]
    rotated = client.post(f"/v1/admin/keys/{made.get_json()['id']}/rotate?overlap=0", headers=auth(admin_key))
    assert rotated.status_code == 201 and rotated.get_json()["scopes"] == ["jobs:read"]
    assert client.delete(f"/v1/admin/keys/{rotated.get_json()['id']}", headers=auth(admin_key)).get_json()["revoked_at"]
    with db.connection() as conn:
        actors = {r["actor"] for r in conn.execute("SELECT actor FROM audit_log WHERE tenant_id = %s AND action <> "
                                                   "'tenant.created'", (t.id,)).fetchall()}
    assert actors == {f"key:{admin_key[:10]}"}
