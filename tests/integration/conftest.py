"""The whole system as separate processes: gunicorn API, router, one GPU worker running the real vLLM
engine, and Flower, over this session's own Postgres and Valkey."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import requests

from ops.services import free_port
from tasks import store
from ops.testbed import Processes

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


@pytest.fixture(scope="session")
def stack(base_settings, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("stack-logs")
    env = {**os.environ, "DATABASE_URL": base_settings.database_url, "REDIS_URL": base_settings.redis_url,
           "SWITCHYARD_MODEL_PATH": str(base_settings.resolved_model_path), "SWITCHYARD_NODE_ID": NODE_ID,
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "FLOWER_UNAUTHENTICATED_API": "1"}
    s = Stack(log_dir, env)
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


@pytest.fixture(scope="session")
def api_key(stack, db):
    return store.create_tenant(db, "integration")[1]


@pytest.fixture(scope="session")
def http(api_key):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    return session
