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
