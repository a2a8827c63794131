"""A tenant's submit rate holds across API processes: two gunicorn APIs share one bucket in Redis, so a
burst of 6 is 6 jobs in all however the requests are spread, and an operator's change of limits
(`python -m ops.admin set-limits`) is in effect on both within a second."""

from __future__ import annotations

import subprocess
import sys
import time

import requests

from tasks.jobs import tenants


def test_the_submit_rate_is_shared_by_two_api_processes(make_cluster):
    cluster = make_cluster()
    tenant, key = tenants.create_tenant(cluster.db, "limited")
    apis = []
    for name in ("api-a", "api-b"):
        cluster.start_api(name)
        cluster.wait_api()
        apis.append(cluster.api)
    env = {**cluster.env, "PYTHONUNBUFFERED": "1"}
    set_limits = subprocess.run([sys.executable, "-m", "ops.admin", "set-limits", tenant.name, "--submit-burst", "6",
                                 "--submit-rate", "0.1"], env=env, capture_output=True, text=True, timeout=60)
    assert set_limits.returncode == 0 and "'submit_burst': 6" in set_limits.stdout, set_limits.stderr
    time.sleep(1.1)  # each API remembers a key's tenant (and limits) for up to a second

    headers = {"Authorization": f"Bearer {key}"}
    codes = [requests.post(f"{apis[i % 2]}/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=headers,
                           timeout=10).status_code for i in range(12)]
    assert sorted(codes) == [202] * 6 + [429] * 6, codes
    with cluster.db.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM jobs WHERE tenant_id = %s", (tenant.id,)).fetchone()["n"] == 6
