"""The reaper without vLLM: a process that starts a tree like vLLM's (a multiprocessing spawn child
holding shared memory, the resource tracker beside it, and a grandchild) is SIGKILLed alone, by its own
pid; its whole tree, the reaper included, must be gone within a few seconds, its shared memory unlinked,
and nothing else touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from ops.processes import ROOT
from tests.workers.support import describe, running, tree, wait_gone

# The grandchild ignores SIGTERM, like a wedged process: only a SIGKILL takes it.
PARENT = '''
import multiprocessing, subprocess, sys, time
from workers.reaper import guard

STUBBORN = "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \\
           "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)"

def child(marker, shm_name):
    from multiprocessing import shared_memory

    # created here, so registered with the resource tracker, as vLLM's engine core does with its own
    shm = shared_memory.SharedMemory(name=shm_name, create=True, size=4096)
    subprocess.Popen([sys.executable, "-c", STUBBORN, marker])
    time.sleep(600)

if __name__ == "__main__":
    guard()
    # daemonic, so that a normal exit terminates it (and orphans the grandchild) rather than joining it
    multiprocessing.get_context("spawn").Process(target=child, args=sys.argv[1:3], daemon=True).start()
    if sys.argv[3] == "exit":
        time.sleep(3)  # long enough for the reaper to record the tree
    else:
        time.sleep(600)
'''


def start_parent(tmp_path, mode: str) -> tuple[subprocess.Popen, list[psutil.Process], Path]:
    """Start the parent script and wait until its tree is complete; returns its shared memory's file too."""
    script, marker = tmp_path / "parent.py", tmp_path / "stubborn-ready"
    shm_name = f"sy-reaper-test-{uuid.uuid4().hex[:8]}"
    script.write_text(PARENT)
    proc = subprocess.Popen([sys.executable, str(script), str(marker), shm_name, mode], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the parent's tree never came up"
        time.sleep(0.1)
    time.sleep(1.5)  # > the reaper's RECORD_SECONDS: the grandchild has been recorded
    return proc, tree(proc.pid), Path("/dev/shm") / shm_name


def test_sigkill_of_the_parent_alone_takes_its_whole_tree(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc, procs, shm = start_parent(tmp_path, "kill")
    try:
        print(f"tree before SIGKILL of {proc.pid}:\n{describe(procs)}")
        assert len(procs) >= 4  # the parent, its resource tracker, spawn child and grandchild (+ the reaper)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left, waited = wait_gone(procs, 10)
        print(f"after {waited:.1f} s, still running: {describe(left) or 'none'}")
        assert not left
        assert not shm.exists()  # the resource tracker outlived the rest long enough to unlink it
        assert bystander.poll() is None  # the reaper touched only the parent's own descendants
    finally:
        for p in running(procs):
            p.kill()
        shm.unlink(missing_ok=True)
        bystander.kill()
        bystander.wait()


def test_a_normal_exit_takes_the_leftovers_too(tmp_path):
    """The parent exits without stopping its child: the reaper cleans up after it and exits as well."""
    proc, procs, shm = start_parent(tmp_path, "exit")
    try:
        assert proc.wait(10) == 0
        left, waited = wait_gone(procs, 10)
        print(f"after the parent's exit and {waited:.1f} s, still running: {describe(left) or 'none'}")
        assert not left
        assert not shm.exists()
    finally:
        for p in running(procs):
            p.kill()
        shm.unlink(missing_ok=True)
