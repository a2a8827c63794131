"""The prefix-cache benchmark: `python -m ops.prefix_bench` (or `make bench-prefix`; `--quick` for a
short run). What prefix-affinity routing buys on real engines.

Two GPU workers with vLLM (its prefix cache on, as by default) serve one workload twice, once routed
`round_robin` and once `prefix_affinity`, everything else alike. The workload is conversations: each
session has a long system prompt of its own (a few hundred to a thousand tokens, shared by all its
turns) and asks a short question per turn, one turn after another (each submitted when the previous
one has been answered, by long-poll), all sessions at once. Each run uses a tenant of its own, so
the second finds nothing the first left in the caches (vLLM's cache is salted per tenant).

With more sessions than one engine's KV cache holds, round robin sends every session to both
workers, so each keeps every system prompt in turn and evicts them before they come back; affinity
keeps a session on one worker, which then holds half of them. Reported per strategy: the prefix-cache
hit rate (prompt tokens found in the cache / prompt tokens looked up, from the workers' own
`vllm:prefix_cache_hits_total` and `_queries_total`), prompt tokens computed, the share of each
session's turns on its most-used worker, and latency p50/p95 per turn (submit → answer heard) and of
the engine alone (the job's started → finished).

Writes docs/bench/prefix.md and docs/bench/prefix.json (`--no-write`: print only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from ops.processes import ROOT
from ops.stats import percentile

DOCS = ROOT / "docs" / "bench"
NODES = ("prefix-gpu-0", "prefix-gpu-1")
STRATEGIES = ("round_robin", "prefix_affinity")
_SUBJECTS = ["a lighthouse keeper's log", "a bakery's recipe book", "a river survey", "a ship's manifest",
             "an orchard's calendar", "a museum catalogue", "a railway timetable", "a beekeeper's notes",
             "a mountain hut's register", "a library's rules", "a garden plan", "a weather diary"]
_FACTS = ["The entry for day {i} records {n} visitors and a wind from the {d}.",
          "Item {i} is kept on shelf {n}, facing {d}.", "On page {i} the count is {n}, written in {d} ink.",
          "Section {i} lists {n} tasks to be done before the {d} gate is opened."]
_WORDS = ["north", "south", "east", "west", "blue", "red", "green", "grey"]
_QUESTIONS = ["What is this document about?", "Name one number it mentions.", "Summarise it in one line.",
              "Which direction comes up first?", "Is there anything unusual in it?", "Who would keep such a record?",
              "What colour is mentioned?", "Give it a short title."]


def say(message: str) -> None:
    print(f"[prefix] {message}", flush=True)


def sessions(n: int, turns: int, facts: int, seed: int) -> list[dict]:
    """n conversations, each a system prompt of `facts` sentences (about 20 tokens each) of its own and
    `turns` short questions."""
    rng = random.Random(seed)
    out = []
    for s in range(n):
        lines = [rng.choice(_FACTS).format(i=i, n=rng.randint(1, 999), d=rng.choice(_WORDS)) for i in range(facts)]
        system = (f"You answer questions about {_SUBJECTS[s % len(_SUBJECTS)]} (copy {s}). "
                  f"Here it is in full.\n" + "\n".join(lines))
        out.append({"session": f"session-{s}", "system": system,
                    "questions": [rng.choice(_QUESTIONS) for _ in range(turns)]})
    return out


def _scrape(port: int) -> dict[str, float]:
    """The worker's prefix-cache counters (in tokens) and prompt tokens, from its /metrics."""
    return counters(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())


def counters(text: str) -> dict[str, float]:
    """vLLM's prefix-cache queries and hits and its prompt tokens (each summed over its label sets) from
    a Prometheus text exposition."""
    wanted = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "hits",
              "vllm:prompt_tokens_total": "prompt_tokens"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


async def _conversation(session, api: str, key: str, conv: dict, strategy: str, max_tokens: int) -> list[dict]:
    """One session's turns, each submitted once the previous one was answered (submit, then long-poll:
    the end-to-end benchmark's user)."""
    from ops.e2e_bench import _switchyard_user

    rows = []
    for question in conv["questions"]:
        body = {"messages": [{"role": "system", "content": conv["system"]}, {"role": "user", "content": question}],
                "max_tokens": max_tokens, "temperature": 0.7,
                "routing": {"strategy": strategy, "session_id": conv["session"]}}
        row = await _switchyard_user(session, api, key, body, "long-poll", None, None)
        if row.get("error"):
            raise RuntimeError(f"{conv['session']}: {row['error']}")
        rows.append(row | {"session": conv["session"]})
    return rows


async def _run(api: str, key: str, convs: list[dict], strategy: str, max_tokens: int) -> list[dict]:
    from ops.e2e_bench import _crowd

    per_session = await _crowd(lambda s, i: _conversation(s, api, key, convs[i], strategy, max_tokens), len(convs))
    return [row for rows in per_session for row in rows]


def _job_facts(cluster, rows: list[dict]) -> None:
    with cluster.db.connection() as conn:
        jobs = {str(r["id"]): r for r in conn.execute(
            "SELECT id, node_id, started_at, finished_at FROM jobs WHERE id = ANY(%s)",
            ([r["job_id"] for r in rows],)).fetchall()}
    for row in rows:
        job = jobs[row["job_id"]]
        row["node"] = job["node_id"]
        row["engine_s"] = (job["finished_at"] - job["started_at"]).total_seconds()


def measure(args, workdir: Path) -> dict:
    from ops.services import EmbeddedPostgres, EmbeddedValkey, free_port
    from ops.testbed import Cluster, fresh_database
    from tasks.jobs import tenants

    convs = sessions(args.sessions, args.turns, args.facts, args.seed)
    pg = EmbeddedPostgres(workdir / "pg", free_port()).start()
    valkey = EmbeddedValkey(workdir / "valkey", free_port()).start()
    cluster = Cluster(workdir / "logs", database_url=fresh_database(pg.url), redis_url=valkey.url,
                      model_path=args.model, fast=False, kv_cache_gib=str(args.kv_cache_gib))
    ports = {node: free_port() for node in NODES}
    results: dict = {"strategies": {}}
    try:
        say(f"starting the API, a router and two GPU workers (vLLM, {args.kv_cache_gib} GiB of KV cache each)")
        cluster.start_api()
        cluster.start_router()
        for node in NODES:
            cluster.start_worker(node, simulated=False, SWITCHYARD_METRICS_PORT=str(ports[node]))
        cluster.wait_api()
        cluster.wait_nodes(list(NODES), timeout=900)
        for strategy in STRATEGIES:
            _, key = tenants.create_tenant(cluster.db, f"prefix-{strategy}")  # its own cache salt
            before = {n: _scrape(p) for n, p in ports.items()}
            say(f"{strategy}: {len(convs)} sessions x {args.turns} turns, all sessions at once")
            started = time.monotonic()
            rows = asyncio.run(_run(cluster.api, key, convs, strategy, args.max_tokens))
            wall = time.monotonic() - started
            after = {n: _scrape(p) for n, p in ports.items()}
            _job_facts(cluster, rows)
            delta = {k: sum(after[n][k] - before[n][k] for n in NODES) for k in ("queries", "hits", "prompt_tokens")}
            by_session: dict[str, Counter] = {}
            for row in rows:
                by_session.setdefault(row["session"], Counter())[row["node"]] += 1
            stay = sum(max(c.values()) for c in by_session.values()) / len(rows)
            latency = [r["heard"] - r["sent"] for r in rows]
            engine = [r["engine_s"] for r in rows]
            out = {"jobs": len(rows), "succeeded": sum(r["status"] == "succeeded" for r in rows),
                   "seconds": wall, "hit_rate": delta["hits"] / delta["queries"] if delta["queries"] else 0.0,
                   "prefix_queries": delta["queries"], "prefix_hits": delta["hits"],
                   "prompt_tokens_computed": delta["queries"] - delta["hits"],
                   "session_on_one_node": stay,
                   "jobs_per_node": dict(Counter(r["node"] for r in rows)),
                   "latency_p50": percentile(latency, 50), "latency_p95": percentile(latency, 95),
                   "engine_p50": percentile(engine, 50), "engine_p95": percentile(engine, 95)}
            say(f"{strategy}: hit rate {out['hit_rate']:.1%}, {out['prompt_tokens_computed']:.0f} prompt tokens "
                f"computed, {stay:.0%} of each session's turns on one node; turn p50 {out['latency_p50']:.2f} s, "
                f"p95 {out['latency_p95']:.2f} s; engine p50 {out['engine_p50']:.2f} s; {wall:.0f} s in all")
            results["strategies"][strategy] = out
    finally:
        cluster.close()
        valkey.stop()
        pg.stop(mode="fast")
    return results


def report(args, results: dict, started: dt.datetime, minutes: float) -> str:
    from ops.bench import machine

    m = machine()
    rr, aff = results["strategies"]["round_robin"], results["strategies"]["prefix_affinity"]
    lines = [
        "# Prefix-cache benchmark", "",
        f"`python -m ops.prefix_bench {' '.join(args.argv)}` — {started:%Y-%m-%d %H:%M} UTC, {minutes:.0f} min; "
        f"two GPU workers (vLLM, {args.kv_cache_gib} GiB KV cache each), {args.sessions} sessions x {args.turns} "
        f"turns, system prompts of {args.facts} sentences, max_tokens {args.max_tokens}, seed {args.seed}; "
        f"machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['os']}.", "",
        "| routing | succeeded | prefix-cache hit rate | prompt tokens computed | a session's turns on one node "
        "| turn p50 | turn p95 | engine p50 | engine p95 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["strategies"].items():
        lines.append(f"| {name} | {r['succeeded']} / {r['jobs']} | {r['hit_rate']:.1%} | "
                     f"{r['prompt_tokens_computed']:.0f} | {r['session_on_one_node']:.0%} | {r['latency_p50']:.2f} s | "
                     f"{r['latency_p95']:.2f} s | {r['engine_p50']:.2f} s | {r['engine_p95']:.2f} s |")
    lines += ["", f"Prefix affinity / round robin: hit rate {aff['hit_rate']:.1%} vs {rr['hit_rate']:.1%}; "
                  f"prompt tokens computed × {aff['prompt_tokens_computed'] / max(rr['prompt_tokens_computed'], 1):.2f}; "
                  f"turn p50 × {aff['latency_p50'] / rr['latency_p50']:.2f}, engine p50 × "
                  f"{aff['engine_p50'] / rr['engine_p50']:.2f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="48 sessions x 3 turns")
    p.add_argument("--sessions", type=int, default=None, help="conversations at once (default 64; --quick 48)")
    p.add_argument("--turns", type=int, default=None, help="questions per session (default 6; --quick 3)")
    p.add_argument("--facts", type=int, default=50,
                   help="sentences per system prompt (about 20 tokens each: 50 make about 1000 tokens)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=int, default=1,
                   help="KV cache per worker (1 GiB holds about 46,000 tokens of the default model: the "
                   "default workload's 64 system prompts of ~1000 tokens fit on two workers, not on one)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/bench alone")
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    args.sessions = args.sessions or (48 if args.quick else 64)
    args.turns = args.turns or (3 if args.quick else 6)
    if args.model is None:
        from tasks.settings import Settings

        args.model = Settings().resolved_model_path
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="switchyard-prefix-") as workdir:
        results = measure(args, Path(workdir))
    text = report(args, results, started, (time.monotonic() - t0) / 60)
    print(text)
    if not args.no_write:
        from ops.bench import machine

        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "prefix.md").write_text(text)
        (DOCS / "prefix.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "machine": machine(), **results}, indent=1))
        say(f"wrote {DOCS / 'prefix.md'} and prefix.json")


if __name__ == "__main__":
    main()
