"""The reaper: a tiny watchdog process that takes a worker's descendants with it when the worker dies.

vLLM starts its engine core with multiprocessing spawn, which also starts Python's resource tracker, and
the core starts its own VLLM::Worker. Nothing ties them to the worker's life: when the worker is
SIGKILLed on its own (the OOM killer, `kill -9 <pid>`, a supervisor that signals only the main pid),
they are reparented to init and keep burning CPU and holding memory. Killing the process group would
catch them, but only when the killer knows to, and a worker need not lead its own group.

`guard()` starts the reaper as a fresh interpreter (not a fork: it must not share the worker's locks,
threads or file descriptors, whose copies would keep the resource tracker's pipe open). The reaper
asks the kernel to signal it when the worker dies (PR_SET_PDEATHSIG; polling os.getppid() is the
fallback), remembers the worker's descendants meanwhile, and once the worker is gone kills what is
left of them, then exits. It does the same after a normal exit, where nothing is usually left.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

log = logging.getLogger("workers.reaper")

# How often descendants are listed. A process the worker starts less than this before it dies escapes,
# unless it is below one already listed; engine processes live far longer.
RECORD_SECONDS = 1.0
# Python's resource tracker (a process beside the engine's) unlinks the shared memory the engine
# registered with it (hundreds of MB of /dev/shm per engine) once every process holding its pipe is
# gone, so it is killed last, given this long to do that. A SIGTERM first would buy nothing: with its
# client gone the engine has nothing to finish, and its graceful shutdown takes 4-9 s on a busy machine.
TRACKER_SECONDS = 2.0
DEATH_SIGNAL = signal.SIGUSR1  # blocked and waited for, so a stray SIGUSR1 only wakes the loop early
PR_SET_PDEATHSIG = 1

_reaper: subprocess.Popen | None = None  # kept: a Popen dropped while its process runs warns


def guard() -> subprocess.Popen:
    """Start the reaper for this process, before the engine. Call it from the main thread: the kernel's
    parent-death signal fires when the thread that started the reaper ends, not the process."""
    global _reaper
    # cwd: where `-m workers.reaper` resolves, whatever the worker's own cwd is. stdout and stderr stay
    # the worker's: its few lines belong in the worker's log, and it exits within seconds of the worker,
    # so whoever reads that output until EOF is not held up.
    _reaper = subprocess.Popen([sys.executable, "-m", "workers.reaper", str(os.getpid())],
                               cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL)
    return _reaper


def _arm_death_signal() -> bool:
    """Ask the kernel for DEATH_SIGNAL when the parent dies (Linux only)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {DEATH_SIGNAL})
    return prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0) == 0


def _record(worker_pid: int, known: dict[int, psutil.Process]) -> None:
    """Add the worker's current descendants to `known`, dropping those that have exited. A descendant
    orphaned while the worker lives stays known. psutil.Process keeps each one's start time, so a
    recycled pid is never mistaken for a descendant."""
    for pid in [pid for pid, proc in known.items() if not proc.is_running()]:
        del known[pid]
    try:
        descendants = psutil.Process(worker_pid).children(recursive=True)
        known.update((c.pid, c) for c in descendants if c.pid != os.getpid())
    except psutil.NoSuchProcess:
        pass  # the worker is gone; the caller notices


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie (a dead process only waiting for init to collect it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _running_trees(procs) -> list[psutil.Process]:
    """The processes still alive and everything alive below them (started since the last record)."""
    found = {}
    for proc in filter(_alive, procs):
        found[proc.pid] = proc
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True) if _alive(c))
        except psutil.NoSuchProcess:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _kill(procs) -> None:
    for proc in procs:
        try:
            proc.kill()  # psutil refuses to signal a pid recycled since it was listed
        except psutil.NoSuchProcess:
            pass


def _wait_gone(procs, timeout: float) -> list[psutil.Process]:
    """What is still running of `procs` (and their trees) after at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := _running_trees(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _describe(procs) -> str:
    def name(proc):
        try:
            return proc.name()
        except psutil.Error:
            return "?"

    return ", ".join(f"{p.pid} {name(p)}" for p in procs)


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def reap(procs) -> None:
    """SIGKILL `procs` and their trees; resource trackers last, given TRACKER_SECONDS to clean up."""
    targets = _running_trees(procs)
    if not targets:
        return
    log.warning("worker gone; killing %d process(es) it left: %s", len(targets), _describe(targets))
    trackers = [p for p in targets if _is_resource_tracker(p)]
    _kill([p for p in targets if p not in trackers])
    _kill(_wait_gone(trackers, TRACKER_SECONDS))


def _record_until_gone(worker_pid: int, known: dict[int, psutil.Process]) -> None:
    armed = _arm_death_signal()
    while os.getppid() == worker_pid:  # checked after arming: the worker may have died before that
        _record(worker_pid, known)
        if armed:
            signal.sigtimedwait({DEATH_SIGNAL}, RECORD_SECONDS)
        else:
            time.sleep(RECORD_SECONDS)


def watch(worker_pid: int) -> None:
    """Record the worker's descendants until it is gone, then reap them."""
    known: dict[int, psutil.Process] = {}
    _record_until_gone(worker_pid, known)
    reap(known.values())


def main() -> None:
    # A group-wide SIGTERM or Ctrl-C is meant for the worker: the reaper outlives it to clean up after.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watch(int(sys.argv[1]))


if __name__ == "__main__":
    main()
