"""The whole system as separate processes: gunicorn API, router, one GPU worker running the real vLLM
engine, and Flower, over this session's own Postgres and Valkey."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import requests

from ops.services import EmbeddedValkey, free_port
from tasks.jobs import tenants
from ops.testbed import Processes, fresh_database
from tasks.db import make_pool

NODE_ID = "test-gpu-0"


class Stack(Processes):
    def __init__(self, log_dir: Path, env: dict[str, str]):
        super().__init__(log_dir, env)
        self.api = f"http://127.0.0.1:{free_port()}"
        self.flower = f"http://127.0.0.1:{free_port()}"

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            try:
                if requests.get(f"{self.api}/readyz", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"stack not ready after {timeout} s:\n{self.log('worker')}")


@pytest.fixture(scope="package")
def stack(backing, base_settings, tmp_path_factory):
    """Package-scoped, with its own database and Valkey: its router's reconciler must not take other
    tests' jobs (routed to made-up nodes) for orphans, and it is gone before the next package runs."""
    pg, _ = backing
    root = tmp_path_factory.mktemp("stack")
    valkey = EmbeddedValkey(root / "valkey", free_port()).start()
    env = {**os.environ, "DATABASE_URL": fresh_database(pg.url), "REDIS_URL": valkey.url,
           "SWITCHYARD_MODEL_PATH": str(base_settings.resolved_model_path), "SWITCHYARD_NODE_ID": NODE_ID,
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "FLOWER_UNAUTHENTICATED_API": "1"}
    (root / "logs").mkdir()
    s = Stack(root / "logs", env)
    py = sys.executable
    s.start("worker", [py, "-m", "workers.gpu"])
    s.start("router", [py, "-m", "workers.router"])
    s.start("api", [py, "-m", "gunicorn", "-c", "ops/gunicorn.conf.py", "-b", s.api.removeprefix("http://"),
                    "api.wsgi:app"])
    s.start("flower", [py, "-m", "celery", "-A", "tasks.app", "flower", f"--port={s.flower.rsplit(':', 1)[1]}",
                       "--address=127.0.0.1"])
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
        valkey.stop()


@pytest.fixture(scope="package")
def api_key(stack):
    with make_pool(stack.env["DATABASE_URL"], max_size=1, name="integration") as pool:
        return tenants.create_tenant(pool, "integration")[1]


@pytest.fixture(scope="package")
def http(api_key):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    return session
