"""A testbed: the system as real processes (API under gunicorn, routers with their reconciler, GPU
workers) over a Postgres database and a Redis server of the caller's own, for the fault and routing
tests and for the routing benchmark.

Its processes are started, watched and stopped by the one harness, ops/processes.py (`Cluster` is a
`ProcessGroup`); what is here is the test bed itself: a fresh database per cluster, the environment
knobs, the Celery/Postgres/Redis clients and the job bookkeeping.

`Cluster` workers use the real vLLM engine or, for orchestration work (routing, failover, queue
overhead), the SimulatedEngine (SWITCHYARD_ENGINE=simulated) at a chosen speed.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import redis as redis_lib

from ops.processes import ProcessGroup
from ops.services import free_port
from tasks.celery_app import create_celery
from tasks.db import make_pool, migrate
from tasks.jobs import lifecycle
from tasks.jobs.status import TERMINAL_VALUES
from tasks.routing import registry
from tasks.routing.strategies import affinity_key
from tasks.settings import Settings

def fresh_database(server_url: str) -> str:
    """A new, migrated database on the session's Postgres server: the cluster's reconciler must not see
    (and re-route) another cluster's jobs."""
    name = "sy_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0] + "/" + name
    migrate(url, log=lambda _m: None)
    return url


#: Faster failure detection than the defaults, so routing and failover tests run in seconds.
FAST_TIMING = {"heartbeat_interval": 0.5, "heartbeat_ttl": 3, "reconcile_interval": 0.5, "retry_backoff_base": 0.2}


class Cluster(ProcessGroup):
    """The system's processes (started with `start_worker`, `start_router`, `start_api`) on their own
    database and Redis, with fast heartbeats and reconciling (`fast=False`: the default timing), plus the
    clients a test or the benchmark uses to submit jobs and follow them. Stopping (`close`) is the
    harness's: SIGTERM to each process group, SIGKILL after the grace period."""

    def __init__(self, log_dir: Path, *, database_url: str, redis_url: str, model_path: Path, fast: bool = True,
                 **settings: str):
        settings = {**(FAST_TIMING if fast else {}), **settings}
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", "SWITCHYARD_MODEL_PATH": str(model_path),
               # no metrics port unless a start asks for one: several clusters share a host
               "SWITCHYARD_METRICS_PORT": "0",
               **{f"SWITCHYARD_{k.upper()}": str(v) for k, v in settings.items()}}
        super().__init__(log_dir, env, grace=30)
        self.settings = Settings(database_url=database_url, redis_url=redis_url, model_path=model_path,
                                 node_id="test-client")
        self.redis = redis_lib.Redis.from_url(redis_url)
        self.db = make_pool(database_url, max_size=4, name="test-cluster")
        self.celery = create_celery(self.settings)
        self.celery.db, self.celery.redis = self.db, self.redis
        self.api: str | None = None
        self.api_name = "api"

    # -- processes ---------------------------------------------------------------------------------

    def start_worker(self, node_id: str, *, name: str | None = None, simulated: bool = True,
                     token_seconds: float = 0.002, **env: str):
        """A GPU worker (`python -m workers.gpu`) for `node_id`; `name` (default: the node id) names the
        process and its log, so several processes may share one node id."""
        extra = {"SWITCHYARD_NODE_ID": node_id, **env}
        if simulated:
            extra |= {"SWITCHYARD_ENGINE": "simulated", "SWITCHYARD_SIM_TOKEN_SECONDS": str(token_seconds)}
        return self.start(name or node_id, [sys.executable, "-m", "workers.gpu"], **extra)

    def start_router(self, name: str = "router", **env: str):
        return self.start(name, [sys.executable, "-m", "workers.router"], SWITCHYARD_NODE_ID=name, **env)

    def start_api(self, name: str = "api"):
        self.api, self.api_name = f"http://127.0.0.1:{free_port()}", name
        return self.start(name, [sys.executable, "-m", "gunicorn", "-c", "ops/gunicorn.conf.py", "-b",
                                 self.api.removeprefix("http://"), "api.wsgi:app"])

    def wait_nodes(self, node_ids: list[str], timeout: float = 120) -> None:
        """Until each node is live and routable in the registry; fails at once if one of them exits."""
        self.wait_until(lambda: set(node_ids) <= {n["id"] for n in registry.live_nodes(self.redis)
                                                  if registry.routable(n)},
                        timeout, f"nodes {node_ids} routable", watch=node_ids, show=node_ids[:1])

    def wait_api(self, timeout: float = 60) -> None:
        import requests

        def up() -> bool:
            try:
                requests.get(f"{self.api}/healthz", timeout=2)
                return True
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                return False

        self.wait_until(up, timeout, f"API {self.api}/healthz answering", watch=[self.api_name])

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.db.close()
            self.redis.close()

    # -- jobs --------------------------------------------------------------------------------------

    def submit(self, tenant_id, n: int, *, strategy: str = "round_robin", max_tokens: int = 16,
               prompt: str = "hello", session_id: str | None = None, max_attempts: int = 3,
               priority: str = "interactive") -> list[str]:
        """Insert and publish jobs exactly as POST /v1/jobs does after validation (no HTTP)."""
        ids = []
        for i in range(n):
            request = {"prompt": f"{prompt} {i}" if session_id is None else prompt, "max_tokens": max_tokens,
                       "temperature": 0, "max_attempts": max_attempts}
            row, _ = lifecycle.submit(self.celery, tenant_id=tenant_id, model=self.settings.model_name,
                                      strategy=strategy, priority=priority, request=request, metadata={},
                                      max_attempts=max_attempts,
                                      session_id=session_id, affinity_key=affinity_key(tenant_id, session_id, request))
            ids.append(str(row["id"]))
        return ids

    def statuses(self, ids: list[str]) -> Counter:
        with self.db.connection() as conn:
            rows = conn.execute("SELECT status FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
        return Counter(r["status"] for r in rows)

    def wait_terminal(self, ids: list[str], timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db.connection() as conn:
                rows = conn.execute("SELECT * FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
            if len(rows) == len(ids) and all(r["status"] in TERMINAL_VALUES for r in rows):
                return rows
            time.sleep(0.25)
        raise AssertionError(f"not all jobs finished in {timeout} s: {self.statuses(ids)}")

    def attempt_outcomes(self, ids: list[str]) -> Counter:
        """(outcome) counts from the attempt log: `succeeded` > len(ids) would mean duplicate results."""
        with self.db.connection() as conn:
            rows = conn.execute("SELECT outcome, count(*) AS n FROM job_attempts WHERE job_id = ANY(%s::uuid[]) "
                                "GROUP BY outcome", (ids,)).fetchall()
        return Counter({r["outcome"]: r["n"] for r in rows})
