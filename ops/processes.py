"""The one process harness: how the quickstart (`python -m ops.cluster`), the test bed (ops/testbed.py),
the test fixtures and the benchmark start, watch and stop the system's processes.

A `ProcessGroup` starts named processes, each

* with its own log file (`<log_dir>/<name>.log`, appended to, stdout and stderr together), and
* as the leader of its own session, hence of its own process group: whatever it starts stays in that
  group (a GPU worker's vLLM EngineCore and its workers, gunicorn's workers, multiprocessing's resource
  tracker), so one signal to the group reaches all of them;
* optionally with a pid file in a run folder (`run_dir`), so that a later process can find and stop what
  an earlier one started (`make up` returns with everything running; `make down` stops it).

Stopping is the same everywhere: SIGTERM to each process group, up to `grace` seconds for the groups to
empty, then SIGKILL to what is left (the groups, and any descendant that had moved out of its group), then
a wait until every one of those processes is gone. A worker's engine processes therefore never outlive
the worker, even when the worker itself was SIGKILLed earlier and left them behind as orphans.

"Gone" means: no such process, or a zombie. A zombie runs nothing and holds nothing but its pid; an
orphan's zombie is reaped by init, and where init does not reap (some sandboxes' init does not) it stays
a zombie forever, which must not count as alive.

Readiness: `wait_until(predicate, timeout, what)` polls a predicate; the group's own `wait_until` also
fails as soon as a watched process exits, and both failures carry the relevant log tails.

ops/testbed.py stays a module of its own: it is the test bed (a database per cluster, the env knobs,
Celery and Postgres clients, job submission and bookkeeping), a user of this harness rather than part
of it, and it pulls in psycopg, redis and Celery, which `python -m ops.cluster down` does not need.
"""

from __future__ import annotations

import os
import signal as signals
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import psutil

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

#: how much of a log an error message quotes
TAIL = 3000


class ProcessError(RuntimeError):
    """A harness failure: a process exited early, or something did not become ready in time."""


class Exited(ProcessError):
    """A watched process exited while we waited for something."""


class NotReady(ProcessError):
    """A `wait_until` predicate never held within its timeout."""


# --- single processes and process groups ----------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group `pgid`."""
    try:
        os.killpg(pgid, 0)  # the cheap answer when the group is empty
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for process `pid` to be gone (or a zombie); False if it is still running after `timeout` s."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_groups(pgids: Iterable[int], grace: float, *, poll: Callable[[], None] = lambda: None,
                kill_wait: float = 10) -> None:
    """SIGTERM each process group; after `grace` s SIGKILL what is left; wait until all of it is gone.

    Descendants that left their leader's group (setsid) are noted before the SIGTERM and killed with the
    rest if they outlast the grace period. `poll` runs on each round (the caller reaps its own children
    there). Raises ProcessError if a process survives even SIGKILL for `kill_wait` s."""
    pgids = list(dict.fromkeys(pgids))
    strays = [p for g in pgids for p in _descendants(g)]  # the leader's pid is its group's id
    for pgid in pgids:
        _signal_group(pgid, signals.SIGTERM)

    def left() -> list[int]:
        poll()
        pids = [pid for g in pgids for pid in group_members(g)]
        for proc in strays:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and proc.pid not in pids:
                    pids.append(proc.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    deadline = time.monotonic() + grace
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not left():
        return
    for pgid in pgids:
        _signal_group(pgid, signals.SIGKILL)
    for proc in strays:
        try:
            if proc.is_running():  # same pid *and* start time: never a stranger that reused the pid
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + kill_wait
    while (survivors := left()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if survivors:
        raise ProcessError(f"processes {survivors} still running {kill_wait:.0f} s after SIGKILL")


# --- logs and waiting -----------------------------------------------------------------------------


def tail(path: Path, chars: int = TAIL) -> str:
    """The end of a log file ('' if there is none), read without loading all of it."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * chars))
            return f.read().decode(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


_tail = tail  # for ProcessGroup.log, whose parameter is called `tail`


def _tails(logs: Iterable[Path], chars: int = TAIL) -> str:
    return "".join(f"\n--- {path} (end) ---\n{tail(path, chars)}" for path in logs if Path(path).exists())


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.1,
               check: Callable[[], None] | None = None, logs: Iterable[Path] = ()) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    `check` runs before each poll and may raise (e.g. `Exited`, when a process the wait depends on is
    gone). On timeout raises NotReady naming `what`, with the tails of `logs`."""
    deadline = time.monotonic() + timeout
    while True:
        if check:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise NotReady(f"{what}: not within {timeout:g} s{_tails(logs)}")
        time.sleep(interval)


# --- the harness ----------------------------------------------------------------------------------


class ProcessGroup:
    """Named processes started from one place, each in its own session with its own log file.

    `env` is every process's environment (default: this one's), to which `start` adds per-process
    variables. With `run_dir`, each start writes `<run_dir>/<name>.pid` (pid and start time), and any
    ProcessGroup on the same run_dir, in this process or a later one, can see and stop it: `pid`,
    `running`, `check` and `stop` work from the pid files for processes it did not start itself. The
    recorded start time keeps a stale pid file from ever naming an unrelated process that reused the pid.

    `procs` holds the Popen of each process this object started (a test may poll or read its pid)."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, *, run_dir: Path | None = None,
                 cwd: Path = ROOT, grace: float = 20):
        self.log_dir, self.run_dir, self.cwd, self.grace = Path(log_dir), run_dir and Path(run_dir), cwd, grace
        self.env = dict(os.environ if env is None else env)
        self.procs: dict[str, subprocess.Popen] = {}

    # -- starting ----------------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        """Start `argv` as `name`: own session and process group, output appended to its log file."""
        if (pid := self.pid(name)) is not None:  # started here, or by another process (its pid file)
            raise ProcessError(f"{name} is already running (pid {pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(argv, cwd=self.cwd, env={**self.env, **env}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                started = psutil.Process(proc.pid).create_time()
            except psutil.NoSuchProcess:  # already gone: record the pid alone
                started = None
            self._pid_file(name).write_text(f"{proc.pid}\n{'' if started is None else repr(started)}\n")
        return proc

    # -- looking ---------------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str, tail: int = 4000) -> str:
        """The last `tail` characters of `name`'s log."""
        return _tail(self.log_path(name), tail)

    def names(self) -> list[str]:
        """Every process this group knows: those it started, then those of the run folder's pid files."""
        filed = sorted(p.stem for p in self.run_dir.glob("*.pid")) if self.run_dir and self.run_dir.exists() else []
        return list(dict.fromkeys([*self.procs, *filed]))

    def _pid_file(self, name: str) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"{name}.pid"

    def _filed(self, name: str) -> tuple[int, float | None] | None:
        if not self.run_dir:
            return None
        try:
            lines = self._pid_file(name).read_text().split("\n")
            return int(lines[0]), float(lines[1]) if len(lines) > 1 and lines[1].strip() else None
        except (OSError, ValueError):
            return None

    def _is_leader(self, pid: int, started: float | None) -> bool | None:
        """True: `pid` is the recorded leader, running. False: it is gone (or a zombie). None: another
        process has that pid now."""
        try:
            proc = psutil.Process(pid)
            if started is not None and abs(proc.create_time() - started) >= 0.01:
                return None
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def pid(self, name: str) -> int | None:
        """The pid of `name` if it is running (started here, or found through its pid file), else None."""
        proc = self.procs.get(name)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        filed = self._filed(name)
        return filed[0] if filed and self._is_leader(*filed) else None

    def running(self, name: str) -> bool:
        return self.pid(name) is not None

    def returncode(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.poll() if proc is not None else None

    def _pgid(self, name: str) -> int | None:
        """The process group to signal when stopping `name`, if it has anything left in it."""
        proc = self.procs.get(name)
        if proc is not None:
            if proc.poll() is None:
                return proc.pid
            # Reaped: a process with its pid now is a stranger; else its group may still hold its children
            # (the pid cannot be reused while that group has members).
            return None if psutil.pid_exists(proc.pid) or not group_members(proc.pid) else proc.pid
        filed = self._filed(name)
        if not filed:
            return None
        leader = self._is_leader(*filed)
        if leader is None:  # the pid belongs to a stranger now: nothing of ours to stop
            return None
        return filed[0] if leader or group_members(filed[0]) else None

    # -- signalling and waiting --------------------------------------------------------------------

    def signal(self, name: str, sig: int, *, group: bool = True) -> None:
        """Send `sig` to `name`'s process group (default), or to its leader alone."""
        if not group and name in self.procs:
            self.procs[name].send_signal(sig)  # a no-op once it has been reaped
            return
        pgid = self._pgid(name)
        if pgid is None:
            raise ProcessError(f"{name}: not running")
        if group:
            os.killpg(pgid, sig)
        else:
            os.kill(pgid, sig)

    def wait_exit(self, name: str, timeout: float) -> int | None:
        """Wait for `name`'s leader to exit; its exit code (None if this group did not start it).
        Raises subprocess.TimeoutExpired after `timeout` seconds."""
        proc = self.procs.get(name)
        if proc is not None:
            return proc.wait(timeout)
        filed = self._filed(name)
        if filed and self._is_leader(*filed) and not wait_gone(filed[0], timeout):
            raise subprocess.TimeoutExpired(name, timeout)
        return None

    def check(self, names: Iterable[str] | None = None) -> None:
        """Raise Exited, with its log tail, if one of `names` (default: all known) is not running."""
        for name in self.names() if names is None else names:
            if not self.running(name):
                code = self.returncode(name)
                raise Exited(f"{name} exited{'' if code is None else f' with {code}'} "
                             f"(log {self.log_path(name)}):\n{self.log(name, TAIL)}")

    def wait_until(self, predicate: Callable[[], T], timeout: float, what: str, *,
                   watch: Iterable[str] | None = None, show: Iterable[str] | None = None,
                   interval: float = 0.2) -> T:
        """`wait_until` that fails at once, with the log tail, if a `watch`ed process (default: all this
        group started) exits; a timeout quotes the logs of `show` (default: the watched ones)."""
        watch = list(self.procs if watch is None else watch)
        show = watch if show is None else list(show)
        return wait_until(predicate, timeout, what, interval=interval, check=lambda: self.check(watch),
                          logs=[self.log_path(n) for n in show])

    # -- stopping ----------------------------------------------------------------------------------

    def stop(self, names: Iterable[str] | None = None, *, grace: float | None = None) -> list[str]:
        """Stop `names` (default: all known) as `stop_groups` does, together; reap those started here and
        remove their pid files. Returns the names that had something running."""
        names = self.names() if names is None else list(names)
        targets = {name: pgid for name in names if (pgid := self._pgid(name)) is not None}
        mine = [self.procs[n] for n in names if n in self.procs]
        try:
            stop_groups(targets.values(), self.grace if grace is None else grace,
                        poll=lambda: [p.poll() for p in mine])
        finally:
            for proc in mine:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if self.run_dir:
                for name in names:
                    self._pid_file(name).unlink(missing_ok=True)
        return [n for n in names if n in targets]

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
