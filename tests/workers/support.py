"""Process-tree helpers for the orphan tests: who a process started, who is still running."""

from __future__ import annotations

import time

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, as psutil objects (which detect a recycled pid)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def running(procs) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(procs, timeout: float) -> tuple[list[psutil.Process], float]:
    """(the processes still running after `timeout`, seconds waited)."""
    started = time.monotonic()
    while running(procs) and time.monotonic() - started < timeout:
        time.sleep(0.1)
    return running(procs), time.monotonic() - started


def describe(procs) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"  {proc.pid} (parent {proc.ppid()}) {' '.join(proc.cmdline())[:110]}")
        except psutil.NoSuchProcess:
            lines.append(f"  {proc.pid} (gone)")
    return "\n".join(lines)
