"""The integration stack: the whole system as separate processes (gunicorn API, router, one GPU worker
running the real vLLM engine, Flower), started, watched and stopped by the harness (ops/processes.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import requests

from ops.processes import ProcessGroup
from ops.services import free_port

NODE_ID = "test-gpu-0"


class Stack(ProcessGroup):
    def __init__(self, log_dir: Path, env: dict[str, str]):
        super().__init__(log_dir, env)
        self.api = f"http://127.0.0.1:{free_port()}"
        self.flower = f"http://127.0.0.1:{free_port()}"

    def start_all(self) -> None:
        py = sys.executable
        self.start("worker", [py, "-m", "workers.gpu"])
        self.start("router", [py, "-m", "workers.router"])
        self.start("api", [py, "-m", "gunicorn", "-c", "ops/gunicorn.conf.py", "-b", self.api.removeprefix("http://"),
                           "api.wsgi:app"])
        self.start("flower", [py, "-m", "celery", "-A", "tasks.app", "flower",
                              f"--port={self.flower.rsplit(':', 1)[1]}", "--address=127.0.0.1"])

    def wait_ready(self, timeout: float = 300) -> None:
        """Until /readyz answers 200 (API, both stores, a routable worker); fails at once if a process
        exits, and on timeout shows the worker's log (it loads the model)."""
        def ready() -> bool:
            try:
                return requests.get(f"{self.api}/readyz", timeout=5).status_code == 200
            except requests.RequestException:  # not listening yet, or still loading (a read timeout)
                return False

        self.wait_until(ready, timeout, f"the stack's {self.api}/readyz", show=["worker"], interval=0.5)
