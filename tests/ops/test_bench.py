"""The routing benchmark's bookkeeping (ops/bench.py), without running it: a run's numbers count
succeeded jobs only, and a run that lost jobs shows in the table."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from ops import bench

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
ROOT = Path(__file__).resolve().parents[2]


def job(i: int, status: str, created: float, finished: float | None = None) -> dict:
    return {"id": f"j{i}", "status": status, "created_at": T0 + dt.timedelta(seconds=created),
            "finished_at": None if finished is None else T0 + dt.timedelta(seconds=finished)}


def test_throughput_and_latency_count_succeeded_jobs_only():
    rows = [job(1, "succeeded", 0, 2), job(2, "succeeded", 1, 5), job(3, "failed", 1, 9),
            job(4, "dead", 2, 9), job(5, "running", 3), job(6, "queued", 4)]
    r = bench.measure(rows, {"j1": "node-1", "j2": "node-3", "j3": "node-2"})
    assert (r["jobs"], r["succeeded"], r["failed"], r["unfinished"]) == (6, 2, 2, 2)
    assert r["throughput"] == 2 / 5  # 2 succeeded between the first created (0) and the last succeeded (5)
    assert r["p50"] == 3.0 and r["p99"] <= 4.0  # latencies 2 and 4: the failed job's 8 s is not among them
    assert r["share"] == [0.5, 0, 0.5] and r["unattributed"] == 0


def test_a_run_without_a_success_has_no_latency():
    r = bench.measure([job(1, "failed", 0, 1), job(2, "queued", 0)], {})
    assert (r["succeeded"], r["failed"], r["unfinished"], r["throughput"]) == (0, 1, 1, 0.0)
    assert r["p95"] is None and r["share"] is None


def test_the_table_shows_failed_and_unfinished_runs():
    ok = bench.measure([job(1, "succeeded", 0, 1), job(2, "succeeded", 0, 2)],
                       {"j1": "node-1", "j2": "node-2"})
    lossy = bench.measure([job(1, "succeeded", 0, 2), job(2, "failed", 0, 2), job(3, "routed", 0)],
                          {"j1": "node-3"})
    empty = bench.measure([job(1, "dead", 0, 1)], {})
    results = {("heterogeneous", bench.PULL): ok, ("heterogeneous", "round_robin"): lossy,
               ("heterogeneous", "least_connections"): empty}
    order = ["round_robin", "least_connections", bench.PULL]
    lines = bench.table(results, order, ["heterogeneous"]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    rows = {r[1]: dict(zip(header, r)) for r in cells}
    assert rows["round robin"]["jobs"] == "3" and rows["round robin"]["succeeded"] == "1"
    assert rows["round robin"]["failed"] == "**1**" and rows["round robin"]["not finished"] == "**1**"
    assert rows["round robin"]["× pull"] == "0.50"
    assert rows["least connections"]["p95 (s)"] == "—" and rows["least connections"]["failed"] == "**1**"
    assert rows["shared-queue pull"]["failed"] == "0" and rows["shared-queue pull"]["× pull"] == "1.00"


def test_the_service_knows_nothing_of_the_pull_baseline():
    """The baseline lives in ops/bench.py (issue 9): no pull queue, pseudo node or setting in the service."""
    pattern = re.compile(r"pull_queue|PULL_QUEUES|pull_node|pull:|node\.pull|shared_queue", re.IGNORECASE)
    hits = [f"{path.relative_to(ROOT)}:{n}" for package in ("api", "tasks", "workers")
            for path in (ROOT / package).rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits
