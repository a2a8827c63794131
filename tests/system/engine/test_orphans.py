"""No orphans (issue 9, point 7): a GPU worker running the real vLLM engine is SIGKILLed by its own pid
alone, as the OOM killer, `kill -9 <pid>` or a supervisor that signals only the main pid would do it (not
its process group, which would hide the problem). Every process it started (the engine core, its
VLLM::Worker, the resource tracker, the reaper) must be gone within 10 s, and the shared memory the
engine held must be unlinked."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import redis as redis_lib

from ops.services import EmbeddedValkey, free_port
from ops.processes import ProcessGroup
from ops.testbed import fresh_database
from tasks.routing import registry
from tests.workers.support import describe, running, tree, wait_gone
from workers.reaper import reap

NODE_ID = "test-orphans-0"


def wait_routable(procs: ProcessGroup, client, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(n["id"] == NODE_ID and registry.routable(n) for n in registry.live_nodes(client)):
        assert procs.procs["worker"].poll() is None, procs.log("worker")
        assert time.monotonic() < deadline, f"not routable after {timeout} s:\n{procs.log('worker')}"
        time.sleep(0.5)


def shared_memory(procs) -> set[str]:
    """The POSIX shared memory files (in /dev/shm) the processes have mapped."""
    return {m.path for p in running(procs) for m in p.memory_maps() if m.path.startswith("/dev/shm/")}


@pytest.mark.engine
def test_sigkill_of_the_worker_pid_alone_leaves_no_process(backing, base_settings, tmp_path):
    pg, _ = backing
    valkey = EmbeddedValkey(tmp_path / "valkey", free_port()).start()
    (tmp_path / "logs").mkdir()
    procs = ProcessGroup(tmp_path / "logs", {
        **os.environ, "DATABASE_URL": fresh_database(pg.url), "REDIS_URL": valkey.url, "HF_HUB_OFFLINE": "1",
        "SWITCHYARD_MODEL_PATH": str(base_settings.resolved_model_path), "SWITCHYARD_NODE_ID": NODE_ID,
        "PYTHONUNBUFFERED": "1"})
    client = redis_lib.Redis.from_url(valkey.url)
    before = []
    try:
        worker = procs.start("worker", [sys.executable, "-m", "workers.gpu"])
        wait_routable(procs, client)
        before = tree(worker.pid)
        shm = shared_memory(before)
        print(f"\nworker tree before SIGKILL of pid {worker.pid} alone:\n{describe(before)}")
        print(f"shared memory mapped: {sorted(shm)}")
        assert any("EngineCore" in p.name() for p in before), describe(before)

        procs.signal("worker", signal.SIGKILL, group=False)
        worker.wait()
        left, waited = wait_gone(before, 10)
        print(f"after {waited:.1f} s, still running: {describe(left) or 'none'}")
        assert not left
        leaked = sorted(path for path in shm if os.path.exists(path))
        print(f"shared memory left in /dev/shm: {leaked or 'none'}")
        assert not leaked
    finally:
        reap(before)  # a failed run must not leave the engine burning CPU, nor its shared memory
        procs.stop()
        client.close()
        valkey.stop()
