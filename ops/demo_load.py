"""A few minutes of mixed traffic against a running cluster, to fill the dashboard: `python -m ops.demo_load`.

Against `make up` (the demo key and, for the RAG jobs and searches, the `switchyard-docs` collection it
made): about two jobs a second (chat jobs; every 5th with RAG, every 7th from the result cache, every
3rd with a webhook to the quickstart's receiver), each long-polled; a search every 5 s, in the three
modes in turn; two bursts of 20 jobs; a cancel now and then; and, given the receiver's pid file, the
receiver frozen for 45 s (SIGSTOP, then SIGCONT) so webhook attempts time out and are retried.
Loopback only; it stops by itself after --duration seconds (used for docs/observability/dashboard.png).
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import threading
import time
from pathlib import Path

import requests

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What does make down do?",
             "How are jobs routed?", "What is a dead letter?", "Explain webhooks in one sentence."]


class Load:
    def __init__(self, api: str, key: str, receiver_url: str):
        self.api, self.headers = api, {"Authorization": f"Bearer {key}"}
        self.hook = {"url": receiver_url, "events": ["job.succeeded", "job.failed", "job.cancelled", "job.dead"]}
        found = [c for c in self._get("/v1/collections").json()["data"] if c["name"] == "switchyard-docs"]
        self.collection = found[0]["id"] if found else None
        self.numbers = itertools.count()
        self.counts = {"submitted": 0, "refused": 0, "errors": 0}

    def _get(self, path: str, **params):
        return requests.get(f"{self.api}{path}", headers=self.headers, params=params, timeout=60)

    def _count(self, what: str) -> None:
        self.counts[what] += 1

    def submit(self) -> str | None:
        n = next(self.numbers)
        body = {"messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}],
                "max_tokens": (16, 24, 32)[n % 3], "temperature": 0}
        if n % 5 == 0 and self.collection:
            body["rag"] = {"collections": [self.collection], "top_k": 2}
        elif n % 7 == 0:
            body["cache"] = True
        if n % 3 == 0:
            body["webhook"] = self.hook
        try:
            answer = requests.post(f"{self.api}/v1/jobs", headers=self.headers, json=body, timeout=60)
        except requests.RequestException:
            self._count("errors")
            return None
        self._count("submitted" if answer.status_code < 400 else "refused")
        return answer.json()["id"] if answer.status_code < 400 else None

    def submit_and_wait(self) -> None:
        job = self.submit()
        if job:
            try:
                self._get(f"/v1/jobs/{job}", wait=30)
            except requests.RequestException:
                self._count("errors")

    def search(self, n: int) -> None:
        if self.collection:
            try:
                self._get(f"/v1/collections/{self.collection}/search", q=QUESTIONS[n % 6], k=3,
                          mode=("hybrid", "vector", "keyword")[n % 3])
            except requests.RequestException:
                self._count("errors")

    def cancel_one(self) -> None:
        job = self.submit()
        if job:
            requests.post(f"{self.api}/v1/jobs/{job}/cancel", headers=self.headers, timeout=60)


def _background(fn, *args) -> None:
    threading.Thread(target=fn, args=args, daemon=True).start()


def run(load: Load, duration: float, receiver_pid: int | None) -> None:
    started = time.monotonic()
    receiver = "up"  # → "frozen" → "back"
    for tick in itertools.count():
        elapsed = time.monotonic() - started
        if elapsed > duration:
            break
        burst = 20 if tick in (int(duration / 6) * 2, int(duration / 1.5) * 2) else 1
        for _ in range(burst):
            _background(load.submit_and_wait)
        if tick % 10 == 0:  # a search every 5 s: the API embeds the query on its own gevent loop
            _background(load.search, tick)
        if tick % 30 == 0:
            _background(load.cancel_one)
        if receiver_pid and receiver == "up" and elapsed >= duration / 3:
            os.kill(receiver_pid, signal.SIGSTOP)
            receiver = "frozen"
            print(f"receiver frozen at {elapsed:.0f} s", flush=True)
        elif receiver == "frozen" and elapsed >= duration / 3 + 45:
            os.kill(receiver_pid, signal.SIGCONT)
            receiver = "back"
            print(f"receiver back at {elapsed:.0f} s", flush=True)
        time.sleep(0.5)
    if receiver == "frozen":
        os.kill(receiver_pid, signal.SIGCONT)
    time.sleep(20)
    print(load.counts, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.demo_load", description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--key-file", type=Path, default=Path(".switchyard/demo-api-key"))
    parser.add_argument("--receiver", default="http://127.0.0.1:8899/hooks")
    parser.add_argument("--receiver-pid-file", type=Path, help="freeze this receiver a while (make up's run/receiver.pid)")
    parser.add_argument("--duration", type=float, default=360)
    args = parser.parse_args(argv)
    pid = int(args.receiver_pid_file.read_text().split()[0]) if args.receiver_pid_file else None
    run(Load(args.api.rstrip("/"), args.key_file.read_text().strip(), args.receiver), args.duration, pid)


if __name__ == "__main__":
    main()
