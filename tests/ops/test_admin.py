"""The operator's key and limit commands, run as an operator runs them (`python -m ops.admin ...`) on a
real Postgres: what they print, what they refuse, and that the keys they print work or stop working."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from tasks.jobs import tenants


def admin(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "ops.admin", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_keys_and_limits_from_the_command_line(base_settings, db):
    url, name = base_settings.database_url, f"cli-{uuid.uuid4().hex[:8]}"
    created = admin(url, "create-tenant", name)
    assert created.returncode == 0 and "api key: sy_" in created.stdout
    reader = admin(url, "create-key", name, "--scopes", "jobs:read", "--label", "dashboard", "--expires-in-days", "2")
    assert reader.returncode == 0 and "scopes jobs:read expires" in reader.stdout, reader.stderr
    key = reader.stdout.split("api key: ")[1].strip()
    assert tenants.tenant_for_key(db, key).scopes == frozenset({"jobs:read"})

    listed = admin(url, "list-keys", name).stdout.splitlines()
    assert len(listed) == 2 and "dashboard" in listed[1] and "expires" in listed[1]
    assert admin(url, "revoke-key", key[:10]).returncode == 0
    assert tenants.tenant_for_key(db, key) is None

    limits = admin(url, "set-limits", name, "--submit-rate", "5", "--max-waits", "10")
    assert limits.returncode == 0 and "'submit_rate': 5.0" in limits.stdout and "'max_waits': 10" in limits.stdout
    for bad in (["--submit-rate", "nan"], ["--max-waits", "2.5"], ["--submit-burst", "-1"]):
        refused = admin(url, "set-limits", name, *bad)
        assert refused.returncode == 2 and "must be a positive" in refused.stderr, (bad, refused.stderr)
    assert admin(url, "create-key", name, "--scopes", "root").returncode == 2
    assert "no tenant named" in admin(url, "list-keys", "nobody-" + name).stderr
