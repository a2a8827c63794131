"""A small real process tree for the harness tests, shaped like a GPU worker's: `python -m
tests.ops.process_tree PIDS [--ignore-term]` starts a child with multiprocessing spawn (as vLLM starts its
EngineCore; spawn also starts multiprocessing's resource tracker), which starts a grandchild the same
way. Each appends its pid to the file PIDS and then sleeps. With --ignore-term the grandchild ignores
SIGTERM, as a stuck engine process would: only SIGKILL ends it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time


def _record(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def grandchild(path: str, ignore_term: bool) -> None:
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _record(path)
    time.sleep(600)


def child(path: str, ignore_term: bool) -> None:
    spawn = multiprocessing.get_context("spawn")
    spawn.Process(target=grandchild, args=(path, ignore_term)).start()
    _record(path)
    time.sleep(600)


def main() -> None:
    path, ignore_term = sys.argv[1], "--ignore-term" in sys.argv
    spawn = multiprocessing.get_context("spawn")
    proc = spawn.Process(target=child, args=(path, ignore_term))
    proc.start()
    _record(path)
    proc.join()


if __name__ == "__main__":
    main()
