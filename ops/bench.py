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
  3. a wait until every job has ended.
Latency = finished_at − created_at of a job (both Postgres's clock); throughput = jobs / (last finished −
first created). A node's capacity is max_num_seqs / (max_tokens × seconds per token) jobs/s.

Shared-queue pull: every worker also consumes one shared queue (SWITCHYARD_PULL_QUEUES) and, with a
prefetch of 2 × max_num_seqs messages (batch_size 1 and batch_concurrency = max_num_seqs in every run:
max_num_seqs generating, as many waiting for a thread), takes a job when it has room. Its jobs skip the
router: they are marked routed to the pseudo node `pull:shared` and their generate message goes straight
onto that queue.

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
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# --- one run ----------------------------------------------------------------------------------------


class Run:
    """A fresh Valkey, database and set of processes for one (fleet, strategy)."""

    def __init__(self, args, pg, model_path: Path, workdir: Path, fleet: str, token_seconds: list[float],
                 strategy: str):
        from ops.services import EmbeddedValkey, free_port
        from ops.testbed import Cluster, fresh_database
        from tasks import store

        self.args, self.fleet, self.strategy, self.token_seconds = args, fleet, strategy, token_seconds
        self.dir = workdir / f"{fleet}-{strategy}"
        (self.dir / "logs").mkdir(parents=True)
        self.valkey = EmbeddedValkey(self.dir / "valkey", free_port()).start()
        self.cluster = Cluster(self.dir / "logs", database_url=fresh_database(pg.url),
                               redis_url=self.valkey.url,
                               model_path=model_path, max_num_seqs=args.max_num_seqs, batch_size=1,
                               batch_concurrency=args.max_num_seqs, pull_queues="shared")
        self.tenant = store.create_tenant(self.cluster.db, "bench")[0]

    def start(self) -> None:
        for node, t in zip(NODES, self.token_seconds):
            self.cluster.start_worker(node, token_seconds=t)
        self.cluster.start_router()
        self.cluster.wait_nodes(NODES, timeout=180)

    def submit(self, session: int) -> str:
        if self.strategy != PULL:
            return self.cluster.submit(self.tenant.id, 1, strategy=self.strategy,
                                       max_tokens=self.args.max_tokens,
                                       prompt=f"session {session}: hello", session_id=f"s{session}")[0]
        return self._submit_pull(session)

    def _submit_pull(self, session: int) -> str:
        """Insert the job as the API does, then skip the router: routed to the pull queue's pseudo node.
        Its routing_strategy (round robin) is only used if the reconciler ever has to re-route it."""
        from tasks import registry, store
        from tasks.celery_app import GENERATE_TASK
        from tasks.routing import affinity_key

        c = self.cluster
        request = {"prompt": f"session {session}: hello", "max_tokens": self.args.max_tokens,
                   "temperature": 0, "max_attempts": 3}
        row, _ = store.insert_job(c.db, tenant_id=self.tenant.id, model=c.settings.model_name,
                                  strategy="round_robin", request=request, metadata={}, max_attempts=3,
                                  session_id=f"s{session}",
                                  affinity_key=affinity_key(f"s{session}", request))
        node = store.pull_node_id("shared")
        store.mark_routed(c.db, row["id"], row["attempt"], node)
        c.celery.send_task(GENERATE_TASK, args=[str(row["id"]), row["attempt"]],
                           queue=registry.node_queue(node))
        return str(row["id"])

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
        done = sum(counts[s] for s in ("succeeded", "failed", "dead", "cancelled"))
        say(f"  {elapsed:5.1f} s: {len(ids)} submitted, {done} done, {counts['running']} running, "
            f"{counts['routed'] + counts['queued']} waiting")

    def wait(self, ids: list[str], timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        start = time.monotonic()
        while True:
            try:
                left = deadline - time.monotonic()
                return self.cluster.wait_terminal(ids, timeout=min(10.0, max(0.1, left)))
            except AssertionError:
                if time.monotonic() >= deadline:
                    raise
                self.progress(ids, self.args.seconds + time.monotonic() - start)

    def close(self) -> None:
        self.cluster.close()
        self.valkey.stop()


def measure(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "succeeded"]
    latencies = [(r["finished_at"] - r["created_at"]).total_seconds() for r in ok]
    span = (max(r["finished_at"] for r in ok) - min(r["created_at"] for r in rows)).total_seconds()
    nodes = Counter(r["node_id"] for r in ok)
    return {"jobs": len(rows), "succeeded": len(ok), "throughput": len(ok) / span,
            **{f"p{q}": percentile(latencies, q) for q in (50, 95, 99)},
            "mean": statistics.fmean(latencies), "share": [nodes[n] / len(ok) for n in NODES]}


def run_one(args, pg, model_path, workdir, fleet, token_seconds, strategy, arrivals, sessions) -> dict:
    say(f"{fleet} fleet, {LABELS[strategy]}: starting a router and {len(NODES)} workers")
    run = Run(args, pg, model_path, workdir, fleet, token_seconds, strategy)
    try:
        run.start()
        warm = [run.submit(i % SESSIONS) for i in range(args.max_num_seqs * len(NODES))]
        run.wait(warm, timeout=120)
        say(f"  warmed up; {len(arrivals)} jobs over {args.seconds:.0f} s")
        ids = run.drive(arrivals, sessions)
        rows = run.wait(ids, timeout=args.seconds * 10 + 120)
    finally:
        run.close()
    result = measure(rows)
    if result["succeeded"] != result["jobs"]:
        say(f"  warning: only {result['succeeded']} of {result['jobs']} jobs succeeded")
    say(f"  {result['throughput']:.2f} jobs/s, p50 {result['p50']:.2f} s, p95 {result['p95']:.2f} s, "
        f"p99 {result['p99']:.2f} s, jobs per node {' / '.join(f'{s:.0%}' for s in result['share'])}")
    return result


# --- report -----------------------------------------------------------------------------------------


def table(results: dict, order: list[str], fleet_names: list[str]) -> str:
    lines = ["| fleet | strategy | jobs | throughput (jobs/s) | × pull | p50 (s) | p95 (s) | p99 (s) | "
             "jobs per node (1× / 2× / 4× or equal) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for fleet in fleet_names:
        base = results.get((fleet, PULL))
        for strategy in order:
            r = results.get((fleet, strategy))
            if r is None:
                continue
            ratio = f"{r['throughput'] / base['throughput']:.2f}" if base else "–"
            lines.append(f"| {fleet} | {LABELS[strategy]} | {r['jobs']} | {r['throughput']:.2f} | {ratio} | "
                         f"{r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
                         f"{' / '.join(f'{s:.0%}' for s in r['share'])} |")
    return "\n".join(lines)


def plot(results: dict, order: list[str], fleet_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(fleet_names)
    colours = {"heterogeneous": "#d95f02", "equal": "#1b9e77"}
    for ax, key, ylabel in ((axes[0], "throughput", "throughput (jobs/s, higher is better)"),
                            (axes[1], "p95", "p95 latency (s, lower is better)")):
        for i, fleet in enumerate(fleet_names):
            xs = [j + (i - (len(fleet_names) - 1) / 2) * width for j in range(len(order))]
            ys = [results[(fleet, s)][key] if (fleet, s) in results else 0 for s in order]
            bars = ax.bar(xs, ys, width, label=f"{fleet} fleet", color=colours.get(fleet))
            ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(range(len(order)), [LABELS[s].replace(" ", "\n", 1) for s in order], fontsize=9)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].legend(loc="lower right", fontsize=9)
    fig.suptitle(title, fontsize=11)
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

- **throughput** = jobs / (last finished − first created); **× pull** = that throughput over the
  shared-queue pull baseline's on the same fleet, measured in the same run. Latency = finished_at −
  created_at per job (Postgres's clock), so it includes the queueing an overloaded cluster builds up.
- **jobs per node**: the share of the jobs each node ran (heterogeneous fleet: its 1×, 2× and 4× node).

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

**Shared-queue pull** (the baseline): every worker also consumes `node.pull:shared`
(`SWITCHYARD_PULL_QUEUES=shared`); its jobs skip the router and are marked routed to the pseudo node
`pull:shared` (the worker that starts a job claims it; the reconciler leaves such jobs alone while a live
node consumes that queue). It needs no knowledge of node speed: a fast node simply comes back for work
sooner.

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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    order = [s for s in STRATEGIES + [PULL] if s in args.strategies.split(",")]
    fleet_names = [f for f in ("heterogeneous", "equal") if f in args.fleets.split(",")]
    if not order or not fleet_names:
        raise SystemExit("nothing to run: check --strategies and --fleets")
    if not args.no_write:
        import matplotlib  # noqa: F401 - fail now, not after the run: `pip install -e '.[bench]'`

    from ops.services import EmbeddedPostgres, free_port
    from workers.model import prepare

    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    model_path = prepare(log=say)
    speeds = fleets(args)
    rng = random.Random(args.seed)
    results: dict[tuple[str, str], dict] = {}
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
    say(f"working folder {workdir}; {len(order)} strategies × {len(fleet_names)} fleets")
    pg = EmbeddedPostgres(workdir / "pg", free_port()).start()
    try:
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
        pg.stop(mode="immediate")
    minutes = (time.monotonic() - t0) / 60
    if args.no_write:
        md_table = table(results, order, fleet_names)
    else:
        md_table = write_report(args, results, order, fleet_names, started, minutes, argv)
    shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(md_table)
    if not args.no_write:
        print(f"\nwrote {DOCS / 'routing.md'} and {DOCS / 'routing.png'} ({minutes:.1f} minutes)")


if __name__ == "__main__":
    main()
