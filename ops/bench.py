"""The routing benchmark: `python -m ops.bench` (or `make bench`).

The four routing strategies, and plain shared-queue pull as the baseline, on a heterogeneous fleet (3
nodes at 1×, 2× and 4× speed) and on an equal one (3 nodes of one speed, the same total capacity), at an
offered load above the fleet's capacity. Real processes (a router with its reconciler, 3 GPU workers)
over a Postgres and a Valkey of its own; the workers run the SimulatedEngine (workers/simulated.py), so
the numbers measure routing and queueing, not vLLM.

Each (fleet, strategy) run gets a fresh database, a fresh Valkey and fresh processes, then:
  1. a warm-up of a few jobs per node (not measured), so nodes have advertised their latency;
  2. open-loop Poisson arrivals at `--load` × the fleet's capacity for `--seconds` (the same seeded
     arrival times for every run), each job in one of 50 sessions (what prefix affinity sticks to);
  3. a wait until every job has ended (or 10 × `--seconds` + 120 s have passed).
Latency = finished_at − created_at of a succeeded job (both Postgres's clock); throughput = succeeded
jobs / (the last one's finished_at − the first submitted job's created_at). A node's capacity is
max_num_seqs / (max_tokens × seconds per token) jobs/s.

Shared-queue pull, the baseline, needs no support in the service (api/, tasks/ and workers/ know
nothing of it): its 3 workers are the same `python -m workers.gpu` processes, with the same settings
and speeds, as in a strategy run, except that all three run as one node id, `pull`. So all three
consume the one queue `node.pull`, and each, with its prefetch of 2 × max_num_seqs messages, takes a
job from it when it has room. Jobs are submitted exactly as in a strategy run (lifecycle.submit, round
robin); with a single live node id the router has only one choice, so the run differs from a strategy
run only in where each worker takes its work from, and pays the same router hop.

Why this and not something else: a bench-only worker entry in ops/ would have to copy workers.gpu's
boot sequence (and drift from it), and could still not start a job routed to a node id other than its
own without the removed `pull:` rule in the SQL that starts jobs; inserting jobs as `routed` past the
router would need store calls and would skip the hop every strategy run pays. Sharing a node id runs
the production worker unchanged; what it costs, and how the bench copes:

- a worker disowns, at boot, every job its node id holds (workers.gpu._recover_previous_life): the
  bench submits nothing until each of the three has heartbeated (its pid seen in the node's record),
  which it does only after that step;
- the three share one heartbeat record (liveness holds while any of them lives; the advertised
  inflight and latencies are whichever wrote last), one assigned set and one cooldown: in this run
  nothing reads them (one node id, round robin) and SimulatedEngine jobs do not fail;
- jobs.node_id says `pull` for every job. To tell the workers apart, every worker of every run gets
  PGAPPNAME=<its process name> (libpq's application_name), and a trigger the bench adds to its own
  throwaway database (`bench_starts`, not a migration) records the application_name of the connection
  that moved each job to `running`. "Jobs per node" comes from that record in every run; in the
  strategy runs it is checked against jobs.node_id;
- not a setup for production: a worker that dies leaves its jobs `running` under a node id that still
  heartbeats, so only job_timeout would take them back. The benchmark injects no faults.

A run's table row counts its submitted jobs as succeeded, failed (failed, dead or cancelled) and not
finished (still active when the wait gave up); throughput and latency are computed from the succeeded
jobs only. A warning is printed, and the counts stand out in the table and plot, when any job did not
succeed.

Every run's processes are stopped and checked to be gone (their process groups, Valkey, Postgres), and
the working folder is removed (`--keep-folder` keeps it, with the processes' logs).

Writes docs/bench/routing.md (table, command, machine) and docs/bench/routing.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ops import processes
from ops.processes import ROOT
from ops.stats import percentile

DOCS = ROOT / "docs" / "bench"
STRATEGIES = ["round_robin", "least_connections", "weighted_response_time", "prefix_affinity"]
PULL = "shared_queue_pull"
LABELS = {"round_robin": "round robin", "least_connections": "least connections",
          "weighted_response_time": "weighted resp. time", "prefix_affinity": "prefix affinity",
          PULL: "shared-queue pull"}
SESSIONS = 50
NODES = ["node-1", "node-2", "node-3"]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fleets(args) -> dict[str, list[float]]:
    """Seconds per output token of each node: the slow node's jobs take `args.job_seconds`."""
    slow = args.job_seconds / args.max_tokens
    hetero = [slow, slow / 2, slow / 4]  # 1×, 2×, 4×
    equal_speed = sum(1 / t for t in hetero) / len(hetero)  # same total capacity as the heterogeneous fleet
    return {"heterogeneous": hetero, "equal": [1 / equal_speed] * len(hetero)}


def capacity(args, token_seconds: list[float]) -> float:
    return sum(args.max_num_seqs / (args.max_tokens * t) for t in token_seconds)


# --- one run ----------------------------------------------------------------------------------------

#: The node id all three workers of the pull run share (so all three consume `node.pull`).
PULL_NODE = "pull"
#: Statuses counted as "failed" in the table (every terminal status but succeeded).
UNSUCCESSFUL = ("failed", "dead", "cancelled")

#: Installed by the bench in each run's own throwaway database (not a migration): which worker process
#: (its connection's application_name, set through PGAPPNAME) moved each attempt of a job to running.
START_LOG_SQL = """
CREATE TABLE bench_starts (job_id uuid NOT NULL, attempt integer NOT NULL, worker text NOT NULL);
CREATE FUNCTION bench_record_start() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_starts VALUES (NEW.id, NEW.attempt, current_setting('application_name'));
    RETURN NULL;
END $$;
CREATE TRIGGER bench_record_start AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (NEW.status = 'running' AND OLD.status <> 'running') EXECUTE FUNCTION bench_record_start();
"""


#: what the bench had to SIGKILL because it outlived its stop (each run's workers, router, Valkey;
#: Postgres): reported at the end
STRAGGLERS: list[str] = []


def _ensure_gone(what: str, pid: int, *, grace: float = 10.0) -> str | None:
    """Wait up to `grace` s for a daemon the bench started (Valkey, Postgres: not started through the
    process harness) to be gone; SIGKILL it if not. Returns a description of what had to be killed."""
    if processes.wait_gone(pid, grace):
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return f"{what} (pid {pid})"


class Run:
    """A fresh Valkey, database and set of processes for one (fleet, strategy)."""

    def __init__(self, args, pg, model_path: Path, workdir: Path, fleet: str, token_seconds: list[float],
                 strategy: str):
        import psycopg

        from ops.services import EmbeddedValkey, free_port
        from ops.testbed import Cluster, fresh_database
        from tasks.jobs.tenants import create_tenant

        self.args, self.fleet, self.strategy, self.token_seconds = args, fleet, strategy, token_seconds
        self.pull = strategy == PULL
        self.dir = workdir / f"{fleet}-{strategy}"
        (self.dir / "logs").mkdir(parents=True)
        self.cluster = None
        self.valkey = EmbeddedValkey(self.dir / "valkey", free_port()).start()
        try:
            database_url = fresh_database(pg.url)
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(START_LOG_SQL)
            self.cluster = Cluster(self.dir / "logs", database_url=database_url, redis_url=self.valkey.url,
                                   model_path=model_path, max_num_seqs=args.max_num_seqs, batch_size=1,
                                   batch_concurrency=args.max_num_seqs)
            self.tenant = create_tenant(self.cluster.db, "bench")[0]
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """NODES[i] runs at token_seconds[i]; in the pull run all of them as node id `pull`."""
        for name, t in zip(NODES, self.token_seconds):
            self.cluster.start_worker(PULL_NODE if self.pull else name, name=name, token_seconds=t,
                                      PGAPPNAME=name)
        self.cluster.start_router()
        if self.pull:
            self._wait_pull_workers(timeout=180)
        else:
            self.cluster.wait_nodes(NODES, timeout=180)

    def _wait_pull_workers(self, timeout: float) -> None:
        """Until every pull worker has heartbeated: each has then done its boot-time recovery, which
        would otherwise take back jobs another worker of node id `pull` had started."""
        from tasks.routing import registry

        c = self.cluster
        pending = {c.procs[name].pid: name for name in NODES}
        deadline = time.monotonic() + timeout
        while pending:
            for name in pending.values():
                if c.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {c.procs[name].returncode}:\n{c.log(name)}")
            for node in registry.live_nodes(c.redis):
                if node["id"] == PULL_NODE and registry.routable(node):
                    pending.pop(node.get("pid"), None)
            if time.monotonic() > deadline:
                name = next(iter(pending.values()))
                raise RuntimeError(f"pull workers {sorted(pending.values())} not heartbeating after "
                                   f"{timeout} s:\n{c.log(name)}")
            time.sleep(0.05)

    def submit(self, session: int) -> str:
        """As POST /v1/jobs does; the pull run's jobs go round robin over its one node id."""
        return self.cluster.submit(self.tenant.id, 1, strategy="round_robin" if self.pull else self.strategy,
                                   max_tokens=self.args.max_tokens,
                                   prompt=f"session {session}: hello", session_id=f"s{session}")[0]

    def drive(self, arrivals: list[float], sessions: list[int]) -> list[str]:
        """Submit at the given offsets (seconds from now); report progress every few seconds."""
        ids: list[str] = []
        start = time.monotonic()
        next_report = start + 5
        for offset, session in zip(arrivals, sessions):
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ids.append(self.submit(session))
            if time.monotonic() >= next_report:
                next_report += 5
                self.progress(ids, time.monotonic() - start)
        lag = time.monotonic() - start - arrivals[-1]
        if lag > 1:
            say(f"  warning: submission fell {lag:.1f} s behind the arrival schedule")
        return ids

    def progress(self, ids: list[str], elapsed: float) -> None:
        counts = self.cluster.statuses(ids)
        done = sum(counts[s] for s in ("succeeded", *UNSUCCESSFUL))
        bad = sum(counts[s] for s in UNSUCCESSFUL)
        say(f"  {elapsed:5.1f} s: {len(ids)} submitted, {done} done"
            + (f" ({bad} not succeeded)" if bad else "")
            + f", {counts['running']} running, {counts['routed'] + counts['queued']} waiting")

    def wait(self, ids: list[str], timeout: float, *, strict: bool = True) -> list[dict]:
        """Every job's row once all have ended. Past `timeout`: raise if `strict`, else warn and return
        the rows as they are (the jobs still active count as not finished)."""
        deadline = time.monotonic() + timeout
        start = time.monotonic()
        while True:
            try:
                left = deadline - time.monotonic()
                return self.cluster.wait_terminal(ids, timeout=min(10.0, max(0.1, left)))
            except AssertionError:
                if time.monotonic() >= deadline:
                    if strict:
                        raise
                    say(f"  warning: not every job ended within {timeout:.0f} s: "
                        f"{dict(self.cluster.statuses(ids))}")
                    return self.rows(ids)
                self.progress(ids, self.args.seconds + time.monotonic() - start)

    def rows(self, ids: list[str]) -> list[dict]:
        with self.cluster.db.connection() as conn:
            return conn.execute("SELECT * FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()

    def workers(self, ids: list[str]) -> dict[str, str]:
        """{job id: the worker process that started its current attempt} (from bench_starts)."""
        with self.cluster.db.connection() as conn:
            rows = conn.execute(
                """SELECT s.job_id, s.worker FROM bench_starts s
                     JOIN jobs j ON j.id = s.job_id AND j.attempt = s.attempt
                    WHERE j.id = ANY(%s::uuid[])""", (ids,)).fetchall()
        return {str(r["job_id"]): r["worker"] for r in rows}

    def close(self) -> list[str]:
        """Stop everything this run started and check that it is gone. The workers and the router stop
        through the process harness (each process group SIGTERMed, SIGKILLed after the grace period; it
        raises if anything survives); Valkey is checked here. Returns what had to be killed."""
        killed = []
        if self.cluster is not None:
            self.cluster.close()
        pid = self.valkey.pid()
        self.valkey.stop()
        if pid is not None:
            killed.append(_ensure_gone("valkey", pid))
        return [k for k in killed if k]


def measure(rows: list[dict], workers: dict[str, str]) -> dict:
    """A run's numbers. Throughput and latency count succeeded jobs only; `share` is the fraction of
    the succeeded jobs each of NODES ran (by `workers`: job id → worker process)."""
    statuses = Counter(r["status"] for r in rows)
    ok = [r for r in rows if r["status"] == "succeeded"]
    failed = sum(statuses[s] for s in UNSUCCESSFUL)
    result = {"jobs": len(rows), "succeeded": len(ok), "failed": failed,
              "unfinished": len(rows) - len(ok) - failed, "throughput": 0.0,
              "p50": None, "p95": None, "p99": None, "mean": None, "share": None, "unattributed": 0}
    if not ok:
        return result
    latencies = [(r["finished_at"] - r["created_at"]).total_seconds() for r in ok]
    span = (max(r["finished_at"] for r in ok) - min(r["created_at"] for r in rows)).total_seconds()
    ran = Counter(workers.get(str(r["id"])) for r in ok)
    result |= {"throughput": len(ok) / span, **{f"p{q}": percentile(latencies, q) for q in (50, 95, 99)},
               "mean": statistics.fmean(latencies), "share": [ran[n] / len(ok) for n in NODES],
               "unattributed": len(ok) - sum(ran[n] for n in NODES)}
    return result


def not_succeeded(r: dict) -> int:
    return r["failed"] + r["unfinished"]


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _shares(r: dict) -> str:
    return "—" if r["share"] is None else " / ".join(f"{s:.0%}" for s in r["share"])


def run_one(args, pg, model_path, workdir, fleet, token_seconds, strategy, arrivals, sessions) -> dict:
    say(f"{fleet} fleet, {LABELS[strategy]}: starting a router and {len(NODES)} workers"
        + (f" (all as node id {PULL_NODE!r})" if strategy == PULL else ""))
    run = Run(args, pg, model_path, workdir, fleet, token_seconds, strategy)
    try:
        run.start()
        warm = [run.submit(i % SESSIONS) for i in range(args.max_num_seqs * len(NODES))]
        run.wait(warm, timeout=120)
        say(f"  warmed up; {len(arrivals)} jobs over {args.seconds:.0f} s")
        ids = run.drive(arrivals, sessions)
        rows = run.wait(ids, timeout=args.seconds * 10 + 120, strict=False)
        workers = run.workers(ids)
    finally:
        killed = run.close()
    STRAGGLERS.extend(killed)
    if killed:
        say(f"  warning: killed what did not stop: {', '.join(killed)}")
    result = measure(rows, workers)
    if strategy != PULL:
        wrong = sum(1 for r in rows
                    if r["status"] == "succeeded" and workers.get(str(r["id"])) != r["node_id"])
        if wrong:
            say(f"  warning: for {wrong} succeeded jobs the worker in bench_starts is not jobs.node_id")
    if not_succeeded(result):
        say(f"  warning: only {result['succeeded']} of {result['jobs']} jobs succeeded "
            f"({result['failed']} failed, {result['unfinished']} not finished)")
    if result["unattributed"]:
        say(f"  warning: {result['unattributed']} succeeded jobs have no recorded worker")
    say(f"  {result['succeeded']}/{result['jobs']} succeeded, {result['throughput']:.2f} jobs/s, "
        f"p50 {_seconds(result['p50'])} s, p95 {_seconds(result['p95'])} s, p99 {_seconds(result['p99'])} s, "
        f"jobs per node {_shares(result)}")
    return result


# --- report -----------------------------------------------------------------------------------------


def table(results: dict, order: list[str], fleet_names: list[str]) -> str:
    """Markdown table; non-zero failed and not-finished counts are bold, so a run that lost jobs shows."""
    lines = ["| fleet | strategy | jobs | succeeded | failed | not finished | throughput (jobs/s) | × pull | "
             "p50 (s) | p95 (s) | p99 (s) | jobs per node (1× / 2× / 4× or equal) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for fleet in fleet_names:
        base = results.get((fleet, PULL))
        for strategy in order:
            r = results.get((fleet, strategy))
            if r is None:
                continue
            ratio = f"{r['throughput'] / base['throughput']:.2f}" if base and base["throughput"] else "—"
            failed, unfinished = (f"**{n}**" if n else "0" for n in (r["failed"], r["unfinished"]))
            lines.append(f"| {fleet} | {LABELS[strategy]} | {r['jobs']} | {r['succeeded']} | {failed} | "
                         f"{unfinished} | {r['throughput']:.2f} | {ratio} | {_seconds(r['p50'])} | "
                         f"{_seconds(r['p95'])} | {_seconds(r['p99'])} | {_shares(r)} |")
    return "\n".join(lines)


def plot(results: dict, order: list[str], fleet_names: list[str], path: Path, title: str) -> None:
    """Throughput and p95 bars (succeeded jobs); a run where some jobs did not succeed is hatched and
    its label says how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(fleet_names)
    colours = {"heterogeneous": "#d95f02", "equal": "#1b9e77"}
    flagged = False
    for ax, key, ylabel in ((axes[0], "throughput", "throughput (succeeded jobs/s, higher is better)"),
                            (axes[1], "p95", "p95 latency of succeeded jobs (s, lower is better)")):
        for i, fleet in enumerate(fleet_names):
            xs = [j + (i - (len(fleet_names) - 1) / 2) * width for j in range(len(order))]
            runs = [results.get((fleet, s)) for s in order]
            ys = [(r[key] or 0) if r else 0 for r in runs]
            bars = ax.bar(xs, ys, width, label=f"{fleet} fleet", color=colours.get(fleet))
            labels = []
            for bar, r in zip(bars, runs):
                if r is None:
                    labels.append("")
                    continue
                label = "—" if r[key] is None else f"{r[key]:.1f}"
                if not_succeeded(r):
                    bar.set_hatch("///")
                    label += f"\n{not_succeeded(r)} of {r['jobs']}\nnot succeeded"
                    flagged = True
                labels.append(label)
            ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
        ax.set_xticks(range(len(order)), [LABELS[s].replace(" ", "\n", 1) for s in order], fontsize=9)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.25 if flagged else 0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    # Patches of their own: the first bar of a fleet may be hatched.
    axes[0].legend(handles=[Patch(color=colours.get(f), label=f"{f} fleet") for f in fleet_names],
                   loc="lower right", fontsize=9)
    fig.suptitle(title + ("\nhatched: runs where some jobs failed or did not finish" if flagged else ""),
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}"}


#: matplotlib and those of its dependencies that the service does not already install (numpy, pillow,
#: python-dateutil and packaging come with vllm / transformers)
_PLOT_PACKAGES = ("matplotlib", "fontTools", "kiwisolver", "contourpy", "pyparsing", "cycler")


def plot_install_size() -> str:
    """`du -sh` of matplotlib and its extra dependencies: "73M (matplotlib 35M, fontTools 30M, ...)"."""
    import importlib.util

    folders = {}
    for name in _PLOT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            folders[name] = list(spec.submodule_search_locations)[0]
    try:
        out = subprocess.run(["du", "-sch", *folders.values()], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    sizes = [line.split()[0] for line in out.splitlines()]
    return f"{sizes[-1]} ({', '.join(f'{n} {z}' for n, z in zip(folders, sizes))})"


def write_report(args, results, order, fleet_names, started: dt.datetime, minutes: float,
                 argv: list[str]) -> str:
    DOCS.mkdir(parents=True, exist_ok=True)
    md_table = table(results, order, fleet_names)
    facts = machine()
    command = "python -m ops.bench" + (" " + shlex.join(argv) if argv else "")
    speeds = fleets(args)
    plot(results, order, fleet_names, DOCS / "routing.png",
         f"Switchyard routing, 3 simulated nodes, offered load {args.load:.2f}× capacity "
         f"for {args.seconds:.0f} s "
         f"({facts['cores']} cores, {started:%Y-%m-%d})")
    fleet_lines = "\n".join(
        f"- **{f}**: {', '.join(f'{t * 1000:.2f}' for t in speeds[f])} ms per token → "
        f"{', '.join(f'{capacity(args, [t]):.1f}' for t in speeds[f])} jobs/s per node, "
        f"capacity {capacity(args, speeds[f]):.1f} jobs/s" for f in fleet_names)
    text = f"""# Routing benchmark

Command: `{command}` (what `make bench` runs; `make bench BENCH_ARGS=--quick` is a 2-minute check that
prints its table and leaves these files alone). Run {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} minutes.
Machine: {facts['cores']} cores ({facts['cpu']}), Python {facts['python']}, {facts['os']}.

{md_table}

- **jobs**: submitted in the measured window, then how many **succeeded**, **failed** (failed, dead or
  cancelled) and were **not finished** when the wait gave up (10 × the window + 120 s); any non-zero
  count there is in bold. Throughput and latency count succeeded jobs only.
- **throughput** = succeeded jobs / (the last one's finished_at − the first submitted job's
  created_at); **× pull** = that throughput over the shared-queue pull baseline's on the same fleet,
  measured in the same run. Latency = finished_at − created_at per succeeded job (Postgres's clock), so
  it includes the queueing an overloaded cluster builds up.
- **jobs per node**: the share of the succeeded jobs each worker process ran (heterogeneous fleet: its
  1×, 2× and 4× node), from the application_name of the connection that started each job (see below).

![throughput and p95 latency per strategy](routing.png)

## Setup

Real processes ({', '.join(NODES)} as GPU workers, one router with its reconciler) over an embedded
Postgres and Valkey, all on this machine; a fresh database, Valkey and processes for every run. The
workers run the **SimulatedEngine** (`SWITCHYARD_ENGINE=simulated`): a node runs up to max_num_seqs =
{args.max_num_seqs} jobs at once, each {args.max_tokens} output tokens at the node's seconds per token, and
the rest wait. These numbers measure routing and queueing, not vLLM.

{fleet_lines}

Load: open-loop Poisson arrivals at {args.load:.2f}× the fleet's capacity for {args.seconds:.0f} s (seed
{args.seed}: the same arrival times in every run of a fleet), each job in one of {SESSIONS} sessions, after an
unmeasured warm-up of {args.max_num_seqs * len(NODES)} jobs. Workers run with batch_size 1 and
batch_concurrency = max_num_seqs, so each holds at most 2 × max_num_seqs messages (Celery's prefetch:
max_num_seqs generating, as many waiting for a thread): routed jobs wait in their node's queue, and in
pull mode a worker takes a job from the shared queue when it has room.

**Shared-queue pull** (the baseline) has no support in the service: its three workers are the same
`python -m workers.gpu` processes with the same settings and speeds, all run as one node id, `pull`, so
all three consume the one queue `node.pull` and each takes a job from it when it has room. Jobs are
submitted as in the other runs (round robin); with one live node id the router has a single choice, so
the run pays the same router hop and differs only in where each worker takes its work from. It needs
no knowledge of node speed: a fast node simply comes back for work sooner. The bench submits nothing
until all three have heartbeated (a worker disowns its node id's jobs at boot). Since jobs.node_id says
`pull` for all of them, each worker runs with `PGAPPNAME` set to its own name, and a trigger the bench
adds to its throwaway database records which connection moved each job to `running`; jobs per node
come from that record in every run (checked against jobs.node_id in the strategy runs). Not a
production setup: a worker that died would leave its jobs under a node id that still heartbeats.

The plot needs matplotlib, an extra (`pip install -e '.[bench]'`, which `make bench` runs), not a
dependency of the service: {plot_install_size()} on disk (`du -sh` of matplotlib and the dependencies it
adds to this virtualenv).
"""
    (DOCS / "routing.md").write_text(text)
    return md_table


# --- main -------------------------------------------------------------------------------------------


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a short check (~2 minutes): --seconds 5, heterogeneous fleet only, table printed, "
                        "docs/bench left alone (unless --write)")
    p.add_argument("--seconds", type=float, default=None,
                   help="length of the arrival window (default 25; quick 5)")
    p.add_argument("--load", type=float, default=1.3,
                   help="offered load as a multiple of capacity (default 1.3)")
    p.add_argument("--max-num-seqs", type=int, default=4, help="concurrent jobs per node (default 4)")
    p.add_argument("--max-tokens", type=int, default=40, help="output tokens per job (default 40)")
    p.add_argument("--job-seconds", type=float, default=1.2,
                   help="run time of one job on the slowest (1×) node (default 1.2)")
    p.add_argument("--strategies", default=",".join(STRATEGIES + [PULL]),
                   help="comma list (default: all five)")
    p.add_argument("--fleets", default=None,
                   help="comma list (default: heterogeneous,equal; quick: heterogeneous)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-write", action="store_true", help="print the table only; leave docs/bench alone")
    p.add_argument("--write", action="store_true", help="with --quick: write docs/bench all the same")
    p.add_argument("--keep-folder", action="store_true",
                   help="keep the working folder (databases, every process's log) instead of removing it")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 5.0 if args.quick else 25.0
    if args.fleets is None:
        args.fleets = "heterogeneous" if args.quick else "heterogeneous,equal"
    args.no_write = args.no_write or (args.quick and not args.write)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    # A SIGTERM (`timeout`, a CI job cancelled) unwinds like Ctrl-C, through the finally blocks that stop
    # every process the bench started and remove its folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    order = [s for s in STRATEGIES + [PULL] if s in args.strategies.split(",")]
    fleet_names = [f for f in ("heterogeneous", "equal") if f in args.fleets.split(",")]
    if not order or not fleet_names:
        raise SystemExit("nothing to run: check --strategies and --fleets")
    if not args.no_write:
        import matplotlib  # noqa: F401 - fail now, not after the run: `pip install -e '.[bench]'`

    from ops.services import EmbeddedPostgres, free_port
    from tasks.settings import Settings
    from workers.model import prepare

    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    model_path = prepare(Settings.from_env().cache_dir, log=say)
    speeds = fleets(args)
    rng = random.Random(args.seed)
    results: dict[tuple[str, str], dict] = {}
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
    say(f"working folder {workdir}; {len(order)} strategies × {len(fleet_names)} fleets")
    pg = None
    try:
        pg = EmbeddedPostgres(workdir / "pg", free_port())
        pg.start()
        for fleet in fleet_names:
            cap = capacity(args, speeds[fleet])
            rate = cap * args.load
            rng.seed(f"{args.seed}-{fleet}")
            arrivals, t = [], rng.expovariate(rate)
            while t < args.seconds:
                arrivals.append(t)
                t += rng.expovariate(rate)
            sessions = [rng.randrange(SESSIONS) for _ in arrivals]
            say(f"{fleet} fleet: capacity {cap:.1f} jobs/s, offering {rate:.1f} jobs/s "
                f"({len(arrivals)} jobs)")
            for strategy in order:
                results[(fleet, strategy)] = run_one(args, pg, model_path, workdir, fleet, speeds[fleet],
                                                     strategy, arrivals, sessions)
    finally:
        if pg is not None:
            stop_postgres(pg)
        if args.keep_folder:
            say(f"kept {workdir} (logs of every process under <fleet>-<strategy>/logs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if workdir.exists():
                say(f"warning: could not remove {workdir}")
        say("every process the bench started has exited (checked, process group by process group)" if not STRAGGLERS else
            f"every process the bench started has exited, {len(STRAGGLERS)} only once killed")
    minutes = (time.monotonic() - t0) / 60
    if args.no_write:
        md_table = table(results, order, fleet_names)
    else:
        md_table = write_report(args, results, order, fleet_names, started, minutes, argv)
    print()
    print(md_table)
    bad = [f"{f} / {LABELS[s]}" for (f, s), r in results.items() if not_succeeded(r)]
    if bad:
        print(f"\nruns where not every job succeeded: {', '.join(bad)}")
    if not args.no_write:
        print(f"\nwrote {DOCS / 'routing.md'} and {DOCS / 'routing.png'} ({minutes:.1f} minutes)")


def stop_postgres(pg) -> None:
    """Stop the bench's Postgres and check that its postmaster is gone (SIGKILL if not)."""
    try:
        pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    pg.stop(mode="immediate")
    killed = _ensure_gone("postgres", pid) if pid is not None else None
    if killed:
        STRAGGLERS.append(killed)
        say(f"warning: killed what did not stop: {killed}")


if __name__ == "__main__":
    main()
