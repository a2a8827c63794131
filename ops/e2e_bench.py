"""The end-to-end benchmark: `python -m ops.e2e_bench` (or `make bench-e2e`; `--quick` for a short run).

One seeded workload of chat requests (mixed prompt lengths and max_tokens, temperature 0.7, the default
model) goes, in one run and one after another on this machine, through:

1. **raw vLLM offline**: `LLM.chat` on the whole list in one call, compiled (vLLM's default), the
   ceiling: no HTTP, no queue, no database. Its model load and compilation are not timed.
2. **vLLM's own OpenAI server** (`python -m vllm.entrypoints.openai.api_server`, default settings):
   every user sends its request at once and waits for the answer, what a user would run instead.
3. **Switchyard**, the whole system as real processes (gunicorn API, router, one GPU worker with vLLM,
   the webhooks worker, over an embedded Postgres and Valkey of its own), once per way a client can
   hear back: each user submits its job, then
   - `long-poll`: `GET /v1/jobs/{id}?wait=30` until the job has finished;
   - `poll`: `GET /v1/jobs/{id}` once a second;
   - `webhook`: waits for the job's signed webhook at a receiver in this process;
   - `cache` (the exact-match result cache): the workload made deterministic (temperature 0,
     `cache: true`); half of it is run first, not measured, then the whole of it is measured with
     long-polls, so about half the jobs can be answered from the cache. Reported: the hit rate and the
     engine time the hits saved (their source jobs' started → finished).
   Its GPU worker runs vLLM compiled (SWITCHYARD_ENFORCE_EAGER's default, like the two baselines);
   `switchyard-eager` runs the long-poll clients once more on a worker in vLLM's eager mode (it loads
   faster and generates less), so both are compared in the same run.

Every user starts at the same moment. Reported per system: completed for the client (the client
learned the final answer), connection errors, jobs/s and output tokens/s (over the span from the
first request to the last answer heard), latency p50/p95/p99 end to end (request sent → answer heard);
for Switchyard also per phase from the jobs' own timestamps: queued (created → routed), on the node
(routed → started: the node's queue and celery-batches' buffer), engine (started → finished), and
heard (finished → the client knew). Ratios Switchyard / vLLM server and Switchyard / raw vLLM are
printed at the end.

Writes docs/bench/e2e.json (everything, per request), docs/bench/e2e.md (the table and the command) and
docs/bench/e2e.png (latency CDF, and answers heard over time). Each system's processes are stopped and
checked gone before the next starts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ops.processes import ROOT, ProcessGroup
from ops.stats import percentile

DOCS = ROOT / "docs" / "bench"
TERMINAL = {"succeeded", "failed", "cancelled", "dead"}
SWITCHYARD_MODES = ("long-poll", "poll", "webhook", "cache")
KV_CACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE for every system alike (Switchyard's default)

_TOPICS = ["the tides", "bread baking", "lighthouses", "glaciers", "honeybees", "the printing press",
           "volcanoes", "sailing ships", "the moon", "coffee", "chess", "rivers", "owls", "bridges"]
_ASKS = ["Explain {t} in two sentences.", "Write a short poem about {t}.", "Give three facts about {t}.",
         "What should a child know about {t}?", "Summarise the history of {t} briefly."]
_CONTEXT = ("Here are some notes. {t} have interested people for centuries; writers, engineers and "
            "farmers each describe them differently, and the notes below collect a few of those views. ")


def say(message: str) -> None:
    print(f"[e2e] {message}", flush=True)


# --- the workload ------------------------------------------------------------------------------------


def workload(n: int, seed: int) -> list[dict]:
    """n chat requests: short, medium and long prompts (a question; a question after a paragraph of
    notes; after several), and max_tokens from 16 to 128."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        topic = rng.choice(_TOPICS)
        notes = _CONTEXT.format(t=topic.capitalize()) * rng.choice([0, 0, 1, 3, 8])
        requests.append({"messages": [{"role": "user", "content": notes + rng.choice(_ASKS).format(t=topic)}],
                         "max_tokens": rng.choice([16, 32, 48, 64, 96, 128]), "temperature": 0.7})
    return requests


def summarize(name: str, rows: list[dict], *, n: int, wall: float | None = None) -> dict:
    """rows: one per request: sent, heard (Unix seconds; heard None if never), tokens, error."""
    heard = [r for r in rows if r.get("heard") is not None and not r.get("error")]
    latencies = [r["heard"] - r["sent"] for r in heard]
    tokens = sum(r.get("tokens") or 0 for r in heard)
    if wall is None and heard:
        wall = max(r["heard"] for r in heard) - min(r["sent"] for r in rows)
    out = {"system": name, "requests": n, "completed": len(heard),
           "connection_errors": sum(1 for r in rows if (r.get("error") or "").startswith("connection")),
           "other_errors": sum(1 for r in rows if r.get("error") and not r["error"].startswith("connection")),
           # what went wrong, by kind (the answer's status and the start of its detail): the most common five
           "error_kinds": dict(Counter(r["error"][:120] for r in rows if r.get("error")).most_common(5)),
           "seconds": wall, "jobs_per_s": len(heard) / wall if wall else None,
           "output_tokens": tokens, "tokens_per_s": tokens / wall if wall else None}
    for q in (50, 95, 99):
        out[f"p{q}"] = percentile(latencies, q) if latencies else None
    return out


# --- raw vLLM offline (a child process: vLLM's engine core starts with spawn) -------------------------


def raw_child(workload_file: str, model: str, eager: bool) -> None:
    from vllm import LLM, SamplingParams

    reqs = json.loads(Path(workload_file).read_text())
    llm = LLM(model=model, max_model_len=2048, enforce_eager=eager, disable_log_stats=True)
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"]) for r in reqs]
    llm.chat([r["messages"][:1] for r in reqs[:4]], params[:4], use_tqdm=False)  # warm-up, not timed
    started = time.time()
    outputs = llm.chat([r["messages"] for r in reqs], params, use_tqdm=False)
    wall = time.time() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("RESULT " + json.dumps({"wall": wall, "tokens": tokens, "completed": len(outputs)}), flush=True)


def run_raw(args, reqs: list[dict], workdir: Path, *, eager: bool) -> dict:
    name = "raw vLLM offline (" + ("eager" if eager else "compiled") + ")"
    say(f"{name}: loading the model in a child process")
    path = workdir / "workload.json"
    path.write_text(json.dumps(reqs))
    argv = [sys.executable, "-m", "ops.e2e_bench", "--raw-child", str(path), "--model", str(args.model)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv + (["--eager"] if eager else []), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    out = {"system": name, "requests": len(reqs), "completed": result["completed"], "connection_errors": 0,
           "other_errors": 0, "seconds": result["wall"], "jobs_per_s": result["completed"] / result["wall"],
           "output_tokens": result["tokens"], "tokens_per_s": result["tokens"] / result["wall"],
           "p50": None, "p95": None, "p99": None}
    say(f"{name}: {out['tokens_per_s']:.0f} output tok/s, {out['jobs_per_s']:.1f} jobs/s")
    return out


# --- the HTTP clients ----------------------------------------------------------------------------------


def _http_error(status: int, body, at: str) -> str:
    """An error answer as `HTTP <status> <at>: <what the problem document says>` (its detail, else the body)."""
    detail = body.get("detail") if isinstance(body, dict) else None
    return f"HTTP {status} {at}: {detail or str(body)[:200]}"


def _connection_error(exc: Exception) -> str:
    return f"connection: {type(exc).__name__}: {exc}"[:300]


async def _server_user(session, url: str, model: str, req: dict) -> dict:
    import aiohttp

    row = {"sent": time.time()}
    try:
        async with session.post(f"{url}/v1/chat/completions", json={"model": model, **req}) as r:
            text = await r.text()
            if r.status != 200:
                return row | {"error": f"HTTP {r.status}: {text[:200]}"}
            body = json.loads(text)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return row | {"error": _connection_error(exc)}
    return row | {"heard": time.time(), "tokens": body["usage"]["completion_tokens"]}


async def _switchyard_user(session, api: str, key: str, req: dict, mode: str, hooks: dict | None,
                           receiver: str | None) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"}
    row = {"sent": time.time()}
    body = {**req, "webhook": {"url": receiver, "events": ["job.succeeded", "job.failed", "job.dead",
                                                           "job.cancelled"]}} \
        if mode == "webhook" else req
    try:
        async with session.post(f"{api}/v1/jobs", json=body, headers=headers) as r:
            job = await r.json(content_type=None)
            if r.status not in (200, 202):
                return row | {"error": _http_error(r.status, job, "at submit")}
        row["job_id"] = job["id"]
        if mode == "webhook":
            event = hooks.setdefault(job["id"], asyncio.get_running_loop().create_future())
            payload = await asyncio.wait_for(event, 900)
            return row | {"heard": payload["heard"], "status": payload["status"]}
        while job["status"] not in TERMINAL:
            if mode == "poll":
                await asyncio.sleep(1.0)
            params = {"wait": "30"} if mode == "long-poll" else {}
            async with session.get(f"{api}/v1/jobs/{job['id']}", params=params, headers=headers) as r:
                job = await r.json(content_type=None)
                if r.status != 200:
                    return row | {"error": _http_error(r.status, job, "while waiting")}
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return row | {"error": _connection_error(exc)}
    return row | {"heard": time.time(), "status": job["status"]}


async def _crowd(make_user, n: int) -> list[dict]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=1800, sock_connect=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return list(await asyncio.gather(*(make_user(session, i) for i in range(n))))


# --- vLLM's OpenAI server -----------------------------------------------------------------------------------


def run_server(args, reqs: list[dict], workdir: Path) -> dict:
    from ops.services import free_port

    name = "vLLM OpenAI server"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = ProcessGroup(workdir / "logs", {**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB,
                                             "HF_HUB_OFFLINE": "1"})
    try:
        say(f"{name}: starting on {url}")
        procs.start("vllm-server", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                    str(args.model), "--port", str(port), "--host", "127.0.0.1",
                                    "--max-model-len", "2048"])
        procs.wait_until(lambda: _answers(f"{url}/health"), 600, f"{name} /health", interval=1)
        asyncio.run(_crowd(lambda s, i: _server_user(s, url, str(args.model), reqs[i]), 8))  # warm-up
        say(f"{name}: {len(reqs)} users at once")
        rows = asyncio.run(_crowd(lambda s, i: _server_user(s, url, str(args.model), reqs[i]), len(reqs)))
    finally:
        procs.stop()
    out = summarize(name, rows, n=len(reqs))
    out["rows"] = rows
    say(_line(out))
    return out


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- Switchyard ---------------------------------------------------------------------------------------------


class _Receiver:
    """Webhooks for the `webhook` mode, received in this process (aiohttp); records when each arrived."""

    def __init__(self, port: int):
        self.port, self.hooks, self._runner = port, {}, None
        self.url = f"http://127.0.0.1:{port}/hooks"

    async def start(self):
        from aiohttp import web

        async def hook(request):
            event = await request.json()
            job = event["data"]
            future = self.hooks.setdefault(job["id"], asyncio.get_running_loop().create_future())
            if not future.done():
                future.set_result({"heard": time.time(), "status": job["status"]})
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hooks", hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self):
        await self._runner.cleanup()


def run_switchyard(args, reqs: list[dict], workdir: Path, *, eager: bool, modes: list[str]) -> list[dict]:
    from ops.services import EmbeddedPostgres, EmbeddedValkey, free_port
    from ops.testbed import Cluster, fresh_database
    from tasks.jobs import tenants

    receiver_port = free_port()
    pg = EmbeddedPostgres(workdir / "pg", free_port()).start()
    valkey = EmbeddedValkey(workdir / "valkey", free_port()).start()
    cluster = Cluster(workdir / "logs", database_url=fresh_database(pg.url), redis_url=valkey.url,
                      model_path=args.model, fast=False, webhook_allow=f"127.0.0.1:{receiver_port}",
                      kv_cache_gib=KV_CACHE_GIB, enforce_eager=str(eager).lower(),
                      max_waits_per_tenant=max(5000, len(reqs)))
    results = []
    try:
        say("Switchyard: starting the API, the router, a GPU worker (vLLM, "
            f"{'eager' if eager else 'compiled'}) and the webhooks worker")
        booted = time.monotonic()
        cluster.start_api()
        cluster.start_router()
        cluster.start_worker("bench-gpu-0", simulated=False)
        cluster.start("webhooks", [sys.executable, "-m", "workers.webhook_worker"])
        cluster.wait_api()
        cluster.wait_nodes(["bench-gpu-0"], timeout=600)
        startup = time.monotonic() - booted
        say(f"Switchyard: ready in {startup:.0f} s (the GPU worker's model load included)")
        def bench_tenant(name: str) -> str:
            """A tenant per mode: its own prefix-cache salt, so no mode finds the prompts cached by the
            one before (the vLLM server and raw vLLM see each prompt once too)."""
            _, key = tenants.create_tenant(cluster.db, name)
            # Every user submits at once: the benchmark's tenant may (the defaults refuse past 2000).
            tenants.set_limits(cluster.db, name, {"submit_burst": 2 * len(reqs) + 100, "submit_rate": 10_000})
            return key

        # The engine's first requests are slow (allocation, warm caches): as for raw vLLM, not measured.
        asyncio.run(_switchyard_mode(cluster.api, bench_tenant("warm-up"), reqs[-8:], "long-poll", receiver_port))
        for mode in modes:
            key = bench_tenant(f"bench-{mode}-{'eager' if eager else 'compiled'}")
            todo = reqs
            if mode == "cache":
                todo = [{**r, "temperature": 0, "cache": True} for r in reqs]
                say(f"Switchyard (cache): warming the cache with {len(todo) // 2} of the requests (not measured)")
                asyncio.run(_switchyard_mode(cluster.api, key, todo[: len(todo) // 2], "long-poll", receiver_port))
            say(f"Switchyard ({mode}): {len(todo)} users at once")
            rows = asyncio.run(_switchyard_mode(cluster.api, key, todo, "long-poll" if mode == "cache" else mode,
                                                receiver_port))
            phases = _phases(cluster, rows)  # also fills in each row's tokens and status from its job
            label = f"Switchyard ({mode}{', eager' if eager else ''})"
            out = summarize(label, rows, n=len(todo))
            out["phases"] = phases
            out["startup_s"] = startup
            out["engine_mode"] = "eager" if eager else "compiled"
            if mode == "cache":
                out["cache"] = _cache_effect(cluster, rows)
                say(f"Switchyard (cache): {out['cache']['hits']} hits of {len(rows)} "
                    f"({out['cache']['hit_rate']:.0%}), {out['cache']['engine_seconds_saved']:.0f} s of engine time saved")
            out["rows"] = rows
            say(_line(out))
            results.append(out)
    finally:
        cluster.close()
        valkey.stop()
        pg.stop(mode="fast")
    return results


async def _switchyard_mode(api: str, key: str, reqs: list[dict], mode: str, receiver_port: int) -> list[dict]:
    receiver = _Receiver(receiver_port)
    if mode == "webhook":
        await receiver.start()
    try:
        return await _crowd(lambda s, i: _switchyard_user(s, api, key, reqs[i], mode, receiver.hooks,
                                                          receiver.url), len(reqs))
    finally:
        if mode == "webhook":
            await receiver.stop()


def _cache_effect(cluster, rows: list[dict]) -> dict:
    """Hits among the measured jobs, and the engine time their source jobs had taken."""
    ids = [r["job_id"] for r in rows if r.get("job_id")]
    with cluster.db.connection() as conn:
        hits = conn.execute(
            """SELECT j.id, extract(epoch FROM s.finished_at - s.started_at) AS engine
                 FROM jobs j JOIN jobs s ON s.id = (j.result -> 'cached' ->> 'job_id')::uuid
                WHERE j.id = ANY(%s::uuid[])""", (ids,)).fetchall()
    return {"hits": len(hits), "hit_rate": len(hits) / len(rows) if rows else 0.0,
            "engine_seconds_saved": float(sum(h["engine"] for h in hits))}


def _phases(cluster, rows: list[dict]) -> dict:
    """Per-phase percentiles from the jobs' timestamps (Postgres's clock) and when the client heard."""
    by_id = {r["job_id"]: r for r in rows if r.get("job_id")}
    with cluster.db.connection() as conn:
        jobs = conn.execute(
            """SELECT id::text, status, extract(epoch FROM created_at) AS created, extract(epoch FROM routed_at) AS routed,
                      extract(epoch FROM started_at) AS started, extract(epoch FROM finished_at) AS finished,
                      (result -> 'usage' ->> 'completion_tokens')::int AS tokens
                 FROM jobs WHERE id = ANY(%s::uuid[])""", (list(by_id),)).fetchall()
    spans = {"queued": [], "on node": [], "engine": [], "heard": []}
    for j in jobs:
        row = by_id[j["id"]]
        row["tokens"], row["status"] = j["tokens"], j["status"]
        if None in (j["routed"], j["started"], j["finished"]):
            continue
        spans["queued"].append(float(j["routed"] - j["created"]))
        spans["on node"].append(float(j["started"] - j["routed"]))
        spans["engine"].append(float(j["finished"] - j["started"]))
        if row.get("heard"):
            spans["heard"].append(row["heard"] - float(j["finished"]))
    return {k: {f"p{q}": percentile(v, q) for q in (50, 95, 99)} for k, v in spans.items() if v}


# --- report ------------------------------------------------------------------------------------------------


def _s(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _line(r: dict) -> str:
    return (f"{r['system']}: {r['completed']}/{r['requests']} completed for the client "
            f"({r['connection_errors']} connection errors), {_s(r['jobs_per_s'])} jobs/s, "
            f"{_s(r['tokens_per_s'])} output tok/s, p50 {_s(r['p50'])} s, p95 {_s(r['p95'])} s, p99 {_s(r['p99'])} s"
            + (f"; errors: {r['error_kinds']}" if r.get("error_kinds") else ""))


def table(results: list[dict]) -> str:
    lines = ["| system | completed for the client | connection errors | jobs/s | output tok/s | p50 | p95 | p99 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['system']} | {r['completed']} / {r['requests']} | {r['connection_errors']} | "
                     f"{_s(r['jobs_per_s'])} | {_s(r['tokens_per_s'])} | {_s(r['p50'])} s | {_s(r['p95'])} s | "
                     f"{_s(r['p99'])} s |".replace("– s", "–"))
    return "\n".join(lines)


def phase_table(results: list[dict]) -> str:
    lines = ["| Switchyard client | queued p50 / p95 | on node p50 / p95 | engine p50 / p95 | heard p50 / p95 |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        if "phases" not in r:
            continue
        cells = [f"{_s(r['phases'].get(k, {}).get('p50'))} / {_s(r['phases'].get(k, {}).get('p95'))} s"
                 for k in ("queued", "on node", "engine", "heard")]
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    server = next((r for r in results if r["system"] == "vLLM OpenAI server"), None)
    raw = next((r for r in results if r["system"].startswith("raw vLLM offline (compiled")), None)
    out = []
    for r in results:
        if not r["system"].startswith("Switchyard") or "cache" in r:  # the cache pass runs another workload
            continue
        parts = []
        if server:
            parts.append(f"tok/s {r['tokens_per_s'] / server['tokens_per_s']:.2f}× the vLLM server")
            if r["p50"] and server["p50"]:
                parts.append(f"p50 {r['p50'] / server['p50']:.2f}× the server's")
        if raw:
            parts.append(f"tok/s {r['tokens_per_s'] / raw['tokens_per_s']:.2f}× raw vLLM (compiled)")
        if parts:
            out.append(f"{r['system']}: " + ", ".join(parts))
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, over_time) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        rows = [x for x in r.get("rows", []) if x.get("heard") is not None and not x.get("error")]
        if not rows:
            continue
        start = min(x["sent"] for x in r["rows"])
        lat = sorted(x["heard"] - x["sent"] for x in rows)
        cdf.plot(lat, [(i + 1) / r["requests"] for i in range(len(lat))], label=r["system"])
        heard = sorted(x["heard"] - start for x in rows)
        over_time.plot(heard, range(1, len(heard) + 1), label=r["system"])
    cdf.set_xlabel("latency, request sent → answer heard (s)")
    cdf.set_ylabel("fraction of requests answered")
    cdf.set_title("latency CDF")
    cdf.grid(alpha=0.3)
    cdf.legend(fontsize=8)
    over_time.set_xlabel("seconds since the first request")
    over_time.set_ylabel("answers heard (cumulative)")
    over_time.set_title("throughput over time")
    over_time.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args, results: list[dict], started: dt.datetime, minutes: float) -> None:
    from ops.bench import machine

    DOCS.mkdir(parents=True, exist_ok=True)
    run = {"command": "python -m ops.e2e_bench " + " ".join(shlex.quote(a) for a in args.argv), "machine": machine(),
           "started": started.isoformat(), "minutes": minutes, "users": args.users, "seed": args.seed,
           "results": results}
    (DOCS / "e2e.json").write_text(json.dumps(run, indent=1, default=str))
    say(f"wrote {DOCS / 'e2e.json'}")
    write_pages(run)


def write_pages(run: dict) -> None:
    """docs/bench/e2e.md and e2e.png from a run's JSON (what write_report stored; `--report` redoes them)."""
    command, m, results = run["command"], run["machine"], run["results"]
    started, minutes, users, seed = dt.datetime.fromisoformat(run["started"]), run["minutes"], run["users"], run["seed"]
    md = [f"# End-to-end benchmark\n", f"`{command}` — {started:%Y-%m-%d %H:%M} UTC, {minutes:.0f} min; "
          f"{users} users at once, seed {seed}; machine: {m['cores']} cores, {m['cpu']}, "
          f"Python {m['python']}, {m['os']}.\n", table(results), "", phase_table(results), "",
          *[f"- {x}" for x in ratios(results)],
          *[f"- result cache: {r['cache']['hits']} hits of {r['requests']} jobs ({r['cache']['hit_rate']:.0%}), "
            f"{r['cache']['engine_seconds_saved']:.0f} s of engine time saved" for r in results if "cache" in r],
          "", "![latency CDF and throughput over time](e2e.png)", ""]
    (DOCS / "e2e.md").write_text("\n".join(md))
    plot(results, DOCS / "e2e.png", f"{users} users, seed {seed}, {m['cores']} cores ({m['cpu']})")
    say(f"wrote {DOCS / 'e2e.md'} and e2e.png")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m ops.e2e_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="300 users, Switchyard by long-poll and webhook, no eager-worker run (~8 min)")
    p.add_argument("--users", type=int, default=None, help="concurrent users (default 1000; --quick 300)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--systems", default="raw,server,switchyard,switchyard-eager",
                   help="comma-separated subset of raw, server, switchyard, switchyard-eager")
    p.add_argument("--modes", default=None, help="Switchyard client modes (default: long-poll,poll,webhook,cache)")
    p.add_argument("--eager-workers", action=argparse.BooleanOptionalAction, default=None,
                   help="`switchyard`'s GPU worker in vLLM eager mode or compiled (default: SWITCHYARD_ENFORCE_EAGER)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/bench alone")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: write docs/bench/e2e.md and e2e.png again from a run's e2e.json")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--raw-child", help=argparse.SUPPRESS)
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.model is None or args.eager_workers is None:
        from tasks.settings import Settings

        settings = Settings.from_env()
        args.model = args.model or settings.resolved_model_path
        args.eager_workers = settings.enforce_eager if args.eager_workers is None else args.eager_workers
    if args.raw_child:
        return raw_child(args.raw_child, str(args.model), args.eager)
    if not args.no_write:
        try:  # fail now, not after the run: the report's plot needs the bench extra
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("the report's plot needs matplotlib: `pip install -e '.[bench]'` (`make bench-e2e` "
                             "does), or pass --no-write to print the tables only") from None
    if args.report:
        return write_pages(json.loads(args.report.read_text()))
    args.users = args.users or (300 if args.quick else 1000)
    args.modes = (args.modes or ("long-poll,webhook" if args.quick else ",".join(SWITCHYARD_MODES))).split(",")
    systems = args.systems.split(",")
    if args.quick and args.systems == p.get_default("systems"):
        systems.remove("switchyard-eager")
    reqs = workload(args.users, args.seed)
    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="switchyard-e2e-") as tmp:
        workdir = Path(tmp)
        if "raw" in systems:
            results.append(run_raw(args, reqs, workdir, eager=False))
        if "server" in systems:
            results.append(run_server(args, reqs, workdir / "server"))
        if "switchyard" in systems:
            results.extend(run_switchyard(args, reqs, workdir / "switchyard", eager=args.eager_workers,
                                          modes=args.modes))
        if "switchyard-eager" in systems:  # the GPU worker in vLLM's eager mode, long-poll clients
            results.extend(run_switchyard(args, reqs, workdir / "switchyard-eager", eager=True,
                                          modes=["long-poll"]))
    minutes = (time.monotonic() - t0) / 60
    print("\n" + table(results) + "\n\n" + phase_table(results) + "\n")
    for line in ratios(results):
        print("  " + line)
    if not args.no_write:
        write_report(args, results, started, minutes)
    say(f"done in {minutes:.1f} min")


if __name__ == "__main__":
    main()
