"""Orchestration capacity: `python -m ops.capacity_bench` (`--quick` for a short run).

How many jobs per second the service itself moves, API → router → GPU worker → Postgres, when the
engine costs (almost) nothing: the GPU workers run the **SimulatedEngine** (workers/simulated.py, named
as such: no model, no real text), 4 output tokens at 0.5 ms each, so what is measured is HTTP, Celery,
Redis and Postgres work. Real processes (gunicorn API with gevent workers, one router with its
reconciler, `--workers` GPU-worker processes), an embedded Postgres and Valkey of the run's own.

For each offered rate (open loop: submissions at fixed intervals from one asyncio client, whatever the
answers' latency), `--seconds` of submissions, then a wait for every job to end. A rate is **sustained**
when every job succeeded, jobs completed at 95 % of the offered rate or more, and the last one finished
within `--grace` seconds of the last submission (the backlog did not grow without bound). Reported per
rate: submit latency p50/p99 (POST sent → 202 received), jobs completed, the achieved completion rate,
and the lag of the last job. The highest sustained rate, and the submit p99 at 500 jobs/s, are the
issue's two figures.

Writes docs/bench/capacity.md and docs/bench/capacity.json (`--no-write`: print only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ops.processes import ROOT
from ops.stats import percentile

DOCS = ROOT / "docs" / "bench"
JOB = {"prompt": "capacity", "max_tokens": 4, "temperature": 0}


def say(message: str) -> None:
    print(f"[capacity] {message}", flush=True)


async def _offer(api: str, key: str, rate: float, seconds: float) -> list[dict]:
    """Submit at `rate` jobs/s for `seconds`; one row per job: when sent, latency, id or error."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"}
    rows: list[dict] = []

    async def one(session, due: float):
        row = {"sent": time.time()}
        started = due  # latency from when the request was due: a client that fell behind counts against it
        try:
            async with session.post(f"{api}/v1/jobs", json=JOB, headers=headers) as r:
                body = await r.json(content_type=None)
                row["latency"] = time.monotonic() - started
                if r.status == 202:
                    row["id"] = body["id"]
                else:
                    row["error"] = f"HTTP {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks, n = [], int(rate * seconds)
        t0 = time.monotonic()
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, t0 + i / rate)))
            if i % 50 == 0:
                await asyncio.sleep(0)  # let answers be read even when behind schedule
        await asyncio.gather(*tasks)
    return rows


def run_rate(cluster, key: str, rate: float, args) -> dict:
    say(f"{rate:.0f} jobs/s for {args.seconds:.0f} s")
    rows = asyncio.run(_offer(cluster.api, key, rate, args.seconds))
    ids = [r["id"] for r in rows if "id" in r]
    last_sent = max(r["sent"] for r in rows)
    deadline = time.time() + args.grace + 60
    while time.time() < deadline:
        with cluster.db.connection() as conn:
            done = conn.execute(
                """SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok,
                          count(*) FILTER (WHERE status IN ('failed', 'dead', 'cancelled')) AS bad,
                          extract(epoch FROM max(finished_at)) AS last, extract(epoch FROM min(created_at)) AS first
                     FROM jobs WHERE id = ANY(%s::uuid[])""", (ids,)).fetchone()
        if done["ok"] + done["bad"] == len(ids):
            break
        time.sleep(0.5)
    latencies = [r["latency"] for r in rows if "id" in r] or [float("nan")]  # accepted submits only
    lag = float(done["last"]) - last_sent if done["last"] else None
    completed = done["ok"]
    span = float(done["last"] - done["first"]) if done["last"] else None
    out = {"offered": rate, "submitted": len(rows), "accepted": len(ids), "errors": len(rows) - len(ids),
           "succeeded": completed, "failed": done["bad"], "submit_p50_ms": percentile(latencies, 50) * 1000,
           "submit_p99_ms": percentile(latencies, 99) * 1000, "completed_per_s": completed / span if span else None,
           "lag_s": lag}
    out["sustained"] = (out["errors"] == 0 and completed == len(rows) and lag is not None and lag <= args.grace
                        and (out["completed_per_s"] or 0) >= 0.95 * rate)
    say(f"  {completed}/{len(rows)} succeeded, {out['completed_per_s'] or 0:.0f} jobs/s completed, submit p50 "
        f"{out['submit_p50_ms']:.1f} ms p99 {out['submit_p99_ms']:.1f} ms, last job {lag or 0:.1f} s after the "
        f"last submit: {'sustained' if out['sustained'] else 'NOT sustained'}")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m ops.capacity_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="100,250,500,750,1000,1250", help="offered jobs/s, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of submissions per rate")
    p.add_argument("--grace", type=float, default=5.0, help="seconds the last job may finish after the last submit")
    p.add_argument("--workers", type=int, default=2, help="simulated GPU-worker processes")
    p.add_argument("--quick", action="store_true", help="rates 250,500 for 10 s each")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.seconds = "250,500", 10.0
    rates = [float(r) for r in args.rates.split(",")]

    from ops.services import EmbeddedPostgres, EmbeddedValkey, free_port
    from ops.testbed import Cluster, fresh_database
    from tasks.jobs import tenants
    from tasks.settings import Settings

    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="switchyard-capacity-") as tmp:
        work = Path(tmp)
        pg = EmbeddedPostgres(work / "pg", free_port()).start()
        valkey = EmbeddedValkey(work / "valkey", free_port()).start()
        cluster = Cluster(work / "logs", database_url=fresh_database(pg.url), redis_url=valkey.url,
                          model_path=Settings.from_env().resolved_model_path, fast=False)
        try:
            cluster.start_api()
            cluster.start_router()
            nodes = [f"sim-{i}" for i in range(args.workers)]
            for node in nodes:
                cluster.start_worker(node, simulated=True, token_seconds=0.0005)
            cluster.wait_api()
            cluster.wait_nodes(nodes)
            _, key = tenants.create_tenant(cluster.db, "capacity")
            # The offered rates are above the default per-tenant submit rate: this tenant may.
            tenants.set_limits(cluster.db, "capacity", {"submit_rate": 100_000, "submit_burst": 100_000})
            asyncio.run(_offer(cluster.api, key, 50, 1))  # warm-up: every API worker has served
            for rate in rates:
                results.append(run_rate(cluster, key, rate, args))
        finally:
            cluster.close()
            valkey.stop()
            pg.stop(mode="fast")
    sustained = [r["offered"] for r in results if r["sustained"]]
    at_500 = next((r for r in results if r["offered"] == 500), None)
    lines = ["| offered jobs/s | succeeded / submitted | completed jobs/s | submit p50 | submit p99 | last job after last submit | sustained |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['offered']:.0f} | {r['succeeded']} / {r['submitted']} | {r['completed_per_s'] or 0:.0f} | "
                     f"{r['submit_p50_ms']:.1f} ms | {r['submit_p99_ms']:.1f} ms | {r['lag_s'] or 0:.1f} s | "
                     f"{'yes' if r['sustained'] else 'no'} |")
    summary = (f"highest sustained rate: {max(sustained):.0f} jobs/s" if sustained else "no rate was sustained")
    if at_500:
        summary += f"; submit p99 at 500 jobs/s: {at_500['submit_p99_ms']:.1f} ms"
    print("\n" + "\n".join(lines) + "\n\n" + summary)
    minutes = (time.monotonic() - t0) / 60
    if not args.no_write:
        from ops.bench import machine

        m = machine()
        command = "python -m ops.capacity_bench " + " ".join(shlex.quote(a) for a in argv)
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "capacity.json").write_text(json.dumps({"command": command, "machine": m, "started": started.isoformat(),
                                                        "results": results}, indent=1))
        (DOCS / "capacity.md").write_text(
            f"# Orchestration capacity (SimulatedEngine)\n\n`{command}` — {started:%Y-%m-%d %H:%M} UTC, {minutes:.0f} min; "
            f"{args.workers} simulated GPU workers, one router, the API with {Settings.from_env().api_workers} gevent "
            f"workers; machine: {m['cores']} cores, {m['cpu']}.\n\n" + "\n".join(lines) + f"\n\n{summary}\n")
        say(f"wrote {DOCS / 'capacity.md'}")
    say(f"done in {minutes:.1f} min")


if __name__ == "__main__":
    main()
