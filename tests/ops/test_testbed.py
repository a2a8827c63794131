"""ops.testbed.Processes.stop(): nothing a process started outlives it, even when the process was
SIGKILLed alone earlier and left its children behind (a GPU worker killed together with its reaper)."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

from ops.testbed import Processes
from tests.workers.test_reaper import running, tree

LEADER = ("import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")


def test_stop_empties_the_group_of_a_leader_killed_alone(tmp_path):
    procs = Processes(tmp_path, dict(os.environ))
    leader = procs.start("leader", [sys.executable, "-c", LEADER])
    deadline = time.monotonic() + 30
    while not psutil.Process(leader.pid).children():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    children = tree(leader.pid)[1:]
    try:
        procs.signal("leader", signal.SIGKILL, group=False)
        leader.wait()
        assert running(children)  # orphaned, and still in the leader's process group
        procs.stop()
        assert not running(children)
    finally:
        for child in running(children):
            child.kill()
