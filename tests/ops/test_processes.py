"""The process harness (ops/processes.py) on real process trees: whatever it stops is gone, the leader,
its spawned children and grandchildren, multiprocessing's resource tracker, also when the leader was
SIGKILLed alone and left its children behind, and also when a later process stops through pid files what
an earlier one started (`make up`, then `make down`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from ops.processes import ROOT, Exited, NotReady, ProcessError, ProcessGroup, alive, wait_until

TREE = [sys.executable, "-m", "tests.ops.process_tree"]


def recorded(path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def tree_of(leader: int, pids_file, expected: int = 3) -> set[int]:
    """Every pid of the tree once it is complete: the recorded ones and all descendants of the leader."""
    wait_until(lambda: len(recorded(pids_file)) >= expected, 60, "the process tree started")
    pids = {leader, *recorded(pids_file), *(p.pid for p in psutil.Process(leader).children(recursive=True))}
    assert len(pids) >= expected + 1, pids  # leader, child, grandchild and at least a resource tracker
    return pids


def assert_gone(pids: set[int]) -> None:
    assert [pid for pid in pids if alive(pid)] == []


@pytest.fixture
def group(tmp_path):
    g = ProcessGroup(tmp_path / "logs", grace=10)
    yield g
    g.stop(grace=1)


def test_stop_leaves_no_process_of_the_tree(group, tmp_path):
    proc = group.start("tree", [*TREE, str(tmp_path / "pids")])
    pids = tree_of(proc.pid, tmp_path / "pids")
    assert all(alive(pid) for pid in pids)
    started = time.monotonic()
    assert group.stop() == ["tree"]
    assert time.monotonic() - started < 5  # SIGTERM was enough: no wait for the grace period
    assert_gone(pids)
    assert proc.returncode is not None  # reaped
    assert group.stop() == []  # nothing left to stop


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(group, tmp_path):
    proc = group.start("tree", [*TREE, str(tmp_path / "pids"), "--ignore-term"])
    pids = tree_of(proc.pid, tmp_path / "pids")
    started = time.monotonic()
    group.stop(grace=1.5)
    assert time.monotonic() - started >= 1.5
    assert_gone(pids)


def test_children_of_a_sigkilled_leader_are_stopped_with_its_group(group, tmp_path):
    """A worker SIGKILLed alone (not its group) leaves its engine processes behind: stop still ends them."""
    proc = group.start("tree", [*TREE, str(tmp_path / "pids")])
    pids = tree_of(proc.pid, tmp_path / "pids")
    group.signal("tree", signal.SIGKILL, group=False)
    assert group.wait_exit("tree", 10) == -signal.SIGKILL
    orphans = [pid for pid in pids if alive(pid)]
    assert orphans  # the leader's children outlived it
    assert not group.running("tree")
    assert group.stop() == ["tree"]
    assert_gone(pids)


def test_a_later_process_stops_through_pid_files_what_an_earlier_one_started(tmp_path):
    """`up` starts detached processes and exits; `down`, another process, finds and stops them."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    up = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from ops.processes import ProcessGroup
        group = ProcessGroup(Path({str(logs)!r}), run_dir=Path({str(run)!r}))
        group.start("tree", {TREE!r} + [{str(tmp_path / 'pids')!r}])
        group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    """)
    subprocess.run([sys.executable, "-c", up], check=True, cwd=ROOT)
    down = ProcessGroup(logs, run_dir=run, grace=10)
    assert down.names() == ["sleeper", "tree"]
    leader = down.pid("tree")
    assert leader and down.running("sleeper")
    pids = tree_of(leader, tmp_path / "pids") | {down.pid("sleeper")}
    down.check()  # both running: no Exited
    assert sorted(down.stop()) == ["sleeper", "tree"]
    assert_gone(pids)
    assert list(run.iterdir()) == []  # pid files removed
    assert ProcessGroup(logs, run_dir=run).names() == []


def test_a_stale_pid_file_never_names_a_stranger(tmp_path):
    """A pid file whose pid now belongs to another process (a different start time) is not ours to stop."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "api.pid").write_text(f"{stranger.pid}\n{psutil.Process(stranger.pid).create_time() - 100!r}\n")
        group = ProcessGroup(tmp_path / "logs", run_dir=run)
        assert not group.running("api")
        assert group.stop() == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_wait_until_fails_at_once_with_the_log_of_an_exited_process(group):
    group.start("crash", [sys.executable, "-c", "import sys; print('engine failed to load: no model'); sys.exit(3)"])
    started = time.monotonic()
    with pytest.raises(Exited, match=r"(?s)crash exited with 3.*engine failed to load: no model"):
        group.wait_until(lambda: False, 60, "crash ready")
    assert time.monotonic() - started < 30


def test_wait_until_times_out_with_the_log_tail_and_returns_the_value(group):
    group.start("slow", [sys.executable, "-c", "print('still loading', flush=True); import time; time.sleep(600)"])
    wait_until(lambda: "still loading" in group.log("slow"), 30, "the log line")
    with pytest.raises(NotReady, match=r"(?s)slow ready: not within 0.5 s.*still loading"):
        group.wait_until(lambda: False, 0.5, "slow ready")
    assert group.wait_until(lambda: {"ok": 1}, 1, "a value") == {"ok": 1}


def test_a_name_runs_once(group):
    group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    with pytest.raises(ProcessError, match="already running"):
        group.start("sleeper", [sys.executable, "-c", "pass"])
