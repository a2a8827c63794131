"""The retrieval benchmark: `python -m ops.rag_bench` (or `make bench-rag`).

What it measures, on an embedded Postgres + pgvector of its own, through the code the service runs, on
one collection that grows through `--sizes` (10 000, then 100 000 chunks):
  1. ingestion throughput (chunks/s, documents/s) from one size to the next: each document stored with
     `store.add_document`, then `ingestion.ingest_document` (parse, chunk, embed in batches with the real
     model, insert, mark ready), one at a time as one ingest-worker thread does, with the settings'
     chunk size, overlap and batch size. The model's forward passes are timed apart (its share);
  2. search latency p50/p95 of `search.search` (k = 10) per mode, vector, keyword and hybrid, at each
     size: the whole call (the query's embedding included) and its SQL alone (the same statements with
     the query's vector computed beforehand). Every query once per round (`--rounds`), after a warm-up
     of `--warmup` queries per mode that is not counted;
  3. HNSW recall@10 against exact search, at the settings' ef_search (40, pgvector's default) and at
     the other `--ef` values. Exact = the same `search.vector_hits` statement with index scans turned
     off (SET LOCAL enable_indexscan = off): a sequential scan that ranks every chunk of the collection.
     Ties count: an HNSW hit as close to the query as the exact 10th is a right answer. At the first
     size the SQL exact answers are checked against numpy's brute force over the vectors read back.
     The plans are read with auto_explain, of the very statement vector_hits runs, at each ef_search:
     pgvector's cost estimate grows with ef_search, and on a small collection the planner may choose a
     sequential scan instead of the HNSW index (exact, so recall 1 for nothing); such cells are marked.

The documents (ops/rag_corpus.py) are synthetic Markdown, recombining sentences of the project's own
prose (tests/data/corpus, README.md, docstrings and comments), seeded; every chunk is embedded by the
model (all-MiniLM-L6-v2 on the CPU). Why not compose vectors to save the model's time (about 60
chunks/s on 2 cores, so half an hour for 100 000): it was tried, a chunk's vector as the token-weighted
mean of the real vectors of its sentences; such vectors came out at a mean cosine of 0.83 to the real
ones and far harder for HNSW (recall@10 0.80 against 0.97 at 2 000 chunks, ef_search 40), so they would
misstate recall. Queries are the 56 questions of tests/data/questions.jsonl, then runs of 3–8 words cut
from pool sentences (seeded), `--queries` in all.

Before measuring at a size: VACUUM ANALYZE of chunks and documents (what autovacuum would have done),
and the sizes of the table and the collection's index. Postgres runs with its defaults
(shared_buffers 128 MB), as the embedded one of `make up` does.

The Postgres is stopped (checked gone) and the working folder removed at the end, on an error, on
Ctrl-C and on SIGTERM (`--keep-folder` keeps it).

Writes docs/bench/retrieval.md (tables, command, machine, date) and docs/bench/retrieval.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ops.bench import DOCS, percentile, say, stop_postgres

K = 10
MODES = ("vector", "keyword", "hybrid")
QUESTIONS = Path(__file__).resolve().parents[1] / "tests" / "data" / "questions.jsonl"


# --- measuring ---------------------------------------------------------------------------------------


def recall_at_k(found: list[tuple[int, float]], exact: list[tuple[int, float]], k: int = K,
                tolerance: float = 1e-6) -> float:
    """Share of the exact k nearest that `found` holds; (chunk id, similarity) pairs, best first. A found
    chunk that is not among the exact k but is as similar as the exact k-th (a tie) counts as right."""
    truth = exact[:k]
    if not truth:
        return 1.0
    kth = truth[-1][1]
    ids = {chunk for chunk, _ in truth}
    return sum(1 for chunk, score in found[:k] if chunk in ids or score >= kth - tolerance) / len(truth)


def _pairs(hits) -> list[tuple[int, float]]:
    return [(h.chunk_id, h.score) for h in hits]


def _summary(values: list[float]) -> dict:
    """p50 / p95 of seconds, in milliseconds."""
    return {"p50": percentile(values, 50) * 1000, "p95": percentile(values, 95) * 1000, "n": len(values)}


class Collection:
    """The benchmark's tenant and collection in the Postgres's (migrated) database, the connection the
    benchmark works on (autocommit, dict rows: as the service's pool hands them out), and the scope
    (search's _Scope) that search's SQL runs in."""

    def __init__(self, pg, settings, embedder):
        from retrieval import store
        from tasks.db import make_pool, migrate
        from tasks.jobs.tenants import create_tenant

        migrate(pg.url, log=lambda _m: None)
        self.pool = make_pool(pg.url, max_size=1, name="rag-bench")
        self.tenant_id = create_tenant(self.pool, "bench")[0].id
        self.conn = self.pool.getconn()
        self.collection = store.create_collection(
            self.conn, self.tenant_id, "bench", embedding_model=embedder.model_name,
            embedding_dim=embedder.dimension, hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction)
        self.index = store.hnsw_index_name(self.collection.id)

    def scope(self, ef_search: int):
        from retrieval.search import DEFAULT_MAX_SCAN_TUPLES, _Scope

        return _Scope(self.tenant_id, [self.collection], None, ef_search, DEFAULT_MAX_SCAN_TUPLES)

    def close(self) -> None:
        self.pool.putconn(self.conn)
        self.pool.close()


class TimedEmbedder:
    """The model, with the time spent in its forward passes for chunks added up in `seconds`."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        start = time.perf_counter()
        try:
            return self.model.embed_documents(texts)
        finally:
            self.seconds += time.perf_counter() - start


def ingest_until(target: int, coll: Collection, embedder, settings, docs, state: dict, label: str) -> dict:
    """Ingest documents from the `docs` iterator until the collection holds `target` chunks or more.
    `state` carries the running totals from one size to the next; returns this segment's numbers."""
    from retrieval import parsing, store
    from retrieval.ingestion import ingest_document

    start_chunks, start_docs = state["chunks"], state["docs"]
    started = last = time.monotonic()
    model_before = embedder.seconds
    while state["chunks"] < target:
        i, (title, content) = next(docs)
        document, created = store.add_document(coll.conn, coll.tenant_id, coll.collection.id, content,
                                               title=title, content_type=parsing.MARKDOWN,
                                               source_filename=f"synthetic-{i}.md")
        if not created:
            continue
        done = ingest_document(coll.conn, embedder, coll.tenant_id, document["id"],
                               chunk_tokens=settings.chunk_tokens, overlap=settings.chunk_overlap,
                               batch_size=settings.embedding_batch_size)
        if done["status"] != "ready":
            raise RuntimeError(f"synthetic document {i} ended {done['status']}: {done['error']}")
        state["chunks"] += done["chunks_total"]
        state["docs"] += 1
        now = time.monotonic()
        if now - last >= 10:
            last = now
            rate = (state["chunks"] - start_chunks) / (now - started)
            say(f"  [{label}] {state['chunks']:,} / {target:,} chunks, {state['docs']:,} documents, "
                f"{rate:.0f} chunks/s, ~{(target - state['chunks']) / rate / 60:.1f} min left")
    seconds = time.monotonic() - started
    chunks, n_docs = state["chunks"] - start_chunks, state["docs"] - start_docs
    model = embedder.seconds - model_before
    say(f"  [{label}] {state['chunks']:,} chunks: +{chunks:,} chunks ({n_docs:,} documents) in "
        f"{seconds:.0f} s, {chunks / seconds:.1f} chunks/s")
    return {"from": start_chunks, "to": state["chunks"], "chunks": chunks, "docs": n_docs, "seconds": seconds,
            "chunks_s": chunks / seconds, "docs_s": n_docs / seconds, "model_seconds": model}


def plan_of(conn, run) -> str:
    """The plan of the statement that reads `nearest` (search.vector_hits's), as auto_explain shows it
    while `run()` executes it: the statement the service runs, not a copy of it."""
    notices: list[str] = []

    def handler(diagnostic):
        notices.append(diagnostic.message_primary or "")

    conn.add_notice_handler(handler)
    settings = {"auto_explain.log_min_duration": "0", "auto_explain.log_level": "notice",
                "auto_explain.log_analyze": "on", "auto_explain.log_timing": "off"}
    try:
        conn.execute("LOAD 'auto_explain'")
        for name, value in settings.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        run()
    finally:
        for name in settings:
            conn.execute(f"RESET {name}")
        conn.remove_notice_handler(handler)
    plans = [n for n in notices if "nearest" in n]
    if not plans:
        return "(no plan captured)"
    lines = plans[-1].splitlines()  # "duration: …", "Query Text: …" (several lines), then the plan
    first = next((i for i, line in enumerate(lines) if "(cost=" in line), len(lines))
    return re.sub(r"'\[[^\]]*\]'", "'[…]'", "\n".join(lines[first:]))  # the query's 384 numbers


def exact_hits(coll: Collection, vector):
    """search.vector_hits with index scans off: a sequential scan ranking every chunk (exact)."""
    from retrieval.search import DEFAULT_EF_SEARCH, vector_hits

    with coll.conn.transaction():
        coll.conn.execute("SET LOCAL enable_indexscan = off")
        return vector_hits(coll.conn, coll.scope(DEFAULT_EF_SEARCH), vector, K)


def check_plans(coll: Collection, vector, ef: int) -> dict:
    """The plans of the vector search at `ef` and of the exact search, and whether each is as meant."""
    hnsw = plan_of(coll.conn, lambda: index_hits(coll, vector, ef, False))
    exact = plan_of(coll.conn, lambda: exact_hits(coll, vector))
    result = {"hnsw_plan": hnsw, "exact_plan": exact, "hnsw_used": coll.index in hnsw,
              "exact_without_index": "hnsw" not in exact}
    say(f"  plans: HNSW index {'used' if result['hnsw_used'] else 'NOT USED'} by the vector search; exact "
        f"search {'scans without it' if result['exact_without_index'] else 'STILL USES AN HNSW INDEX'}")
    return result


def time_searches(coll: Collection, model, queries: list[str], vectors, mode: str, args, ef: int) -> dict:
    """p50/p95 of search.search (the whole call) and of its SQL alone, over `args.rounds` rounds."""
    from retrieval.search import _search_one, search

    def whole(i):
        search(coll.conn, model, coll.tenant_id, [coll.collection.id], queries[i], k=K, mode=mode,
               ef_search=ef)

    def sql(i):
        _search_one(coll.conn, coll.scope(ef), queries[i], vectors[i], K, mode)

    out = {}
    for name, call in (("total", whole), ("sql", sql)):
        for i in range(min(args.warmup, len(queries))):
            call(i)
        seconds = []
        for _ in range(args.rounds):
            for i in range(len(queries)):
                start = time.perf_counter()
                call(i)
                seconds.append(time.perf_counter() - start)
        out[name] = _summary(seconds)
    say(f"  {mode:7}: p50 {out['total']['p50']:6.1f} ms, p95 {out['total']['p95']:6.1f} ms "
        f"(SQL alone {out['sql']['p50']:.1f} / {out['sql']['p95']:.1f} ms)")
    return out


def index_hits(coll: Collection, vector, ef: int, force: bool):
    """search.vector_hits; with `force`, sequential scans, bitmap scans and sorts are off for it, so that
    the planner takes the HNSW index (which returns rows in order, needing no sort) where it would rather
    rank a small collection whole."""
    from retrieval.search import vector_hits

    if not force:
        return vector_hits(coll.conn, coll.scope(ef), vector, K)
    with coll.conn.transaction():
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            coll.conn.execute(f"SET LOCAL {setting} = off")
        return vector_hits(coll.conn, coll.scope(ef), vector, K)


def recall_sweep(coll: Collection, vectors, efs: list[int]) -> dict:
    exact, exact_seconds = [], []
    for v in vectors:
        start = time.perf_counter()
        exact.append(_pairs(exact_hits(coll, v)))
        exact_seconds.append(time.perf_counter() - start)
    out = {"exact": _summary(exact_seconds), "exact_pairs": exact, "ef": {}}
    for ef in efs:
        # pgvector's cost estimate grows with ef_search: on a small collection the planner may prefer a
        # sequential scan (exact: recall 1, but not the index's). Then the index is forced, to measure it.
        def plan(force: bool) -> str:
            return plan_of(coll.conn, lambda: index_hits(coll, vectors[0], ef, force))

        chosen = coll.index in plan(False)
        if not chosen and coll.index not in plan(True):
            out["ef"][ef] = None
            say(f"  ef_search {ef:4}: the HNSW index could not be made to serve the query; not measured")
            continue
        recalls, seconds = [], []
        for v, truth in zip(vectors, exact):
            start = time.perf_counter()
            hits = index_hits(coll, v, ef, not chosen)
            seconds.append(time.perf_counter() - start)
            recalls.append(recall_at_k(_pairs(hits), truth))
        out["ef"][ef] = {"recall": statistics.fmean(recalls), "min": min(recalls),
                         "below_1": sum(r < 1 for r in recalls), "index_chosen": chosen, **_summary(seconds)}
        say(f"  ef_search {ef:4}: recall@{K} {out['ef'][ef]['recall']:.4f} (min {min(recalls):.1f}), "
            f"HNSW query p50 {out['ef'][ef]['p50']:.2f} ms"
            + ("" if chosen else " (the planner prefers a sequential scan here: index forced)"))
    say(f"  exact (sequential scan) p50 {out['exact']['p50']:.1f} ms")
    return out


def check_exact(coll: Collection, vectors, exact: list[list[tuple[int, float]]]) -> dict:
    """Compare the SQL exact answers with numpy's brute force over every ready chunk's vector."""
    import numpy as np

    rows = coll.conn.execute(
        """SELECT c.id, c.embedding::text AS v FROM chunks c JOIN documents d ON d.id = c.document_id
            WHERE c.collection_id = %s AND d.status = 'ready' ORDER BY c.id""",
        (coll.collection.id,)).fetchall()
    ids = np.array([r["id"] for r in rows])
    matrix = np.array([np.array(r["v"][1:-1].split(","), dtype=np.float64) for r in rows])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    agree = 0
    for v, truth in zip(vectors, exact):
        q = np.asarray(v, dtype=np.float64)
        sims = matrix @ (q / np.linalg.norm(q))
        top = np.argsort(-sims, kind="stable")[:K]
        brute = [(int(ids[i]), float(sims[i])) for i in top]
        agree += recall_at_k(truth, brute, tolerance=1e-5) == 1.0
    say(f"  exact search agrees with numpy's brute force over {len(rows):,} vectors on {agree} of "
        f"{len(vectors)} queries")
    return {"agree": agree, "queries": len(vectors), "rows": len(rows)}


def measure(coll: Collection, model, queries, vectors, args, settings, *, verify: bool) -> dict:
    conn = coll.conn
    say("  VACUUM ANALYZE chunks, documents")
    conn.execute("VACUUM ANALYZE chunks")
    conn.execute("VACUUM ANALYZE documents")
    sizes = conn.execute(
        "SELECT pg_size_pretty(pg_total_relation_size('chunks')) AS chunks_table, "
        "pg_size_pretty(pg_relation_size(%s::regclass)) AS hnsw_index", (coll.index,)).fetchone()
    ef = settings.hnsw_ef_search
    result = {"sizes": sizes, **check_plans(coll, vectors[0], ef)}
    result["latency"] = {mode: time_searches(coll, model, queries, vectors, mode, args, ef) for mode in MODES}
    efs = sorted(set(args.ef) | {ef})
    result["recall"] = recall_sweep(coll, vectors, efs)
    if verify:
        result["exact_check"] = check_exact(coll, vectors, result["recall"].pop("exact_pairs"))
    else:
        result["recall"].pop("exact_pairs")
    return result


# --- the run -----------------------------------------------------------------------------------------


def make_queries(rng: random.Random, pool, n: int) -> list[str]:
    """The labelled questions first, then word runs cut from pool sentences."""
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    queries = questions[:n]
    while len(queries) < n:
        words = rng.choice(pool.sentences).rstrip(".!?").split()
        size = min(len(words), rng.randint(3, 8))
        start = rng.randrange(len(words) - size + 1)
        queries.append(" ".join(words[start:start + size]))
    return queries


def documents(seed: int, pool):
    from ops.rag_corpus import synth_document

    rng = random.Random(seed)
    i = 0
    while True:
        yield i, synth_document(rng, pool)
        i += 1


def run_sizes(pg, model, pool, queries, vectors, args, settings, results: dict) -> None:
    """Grow one collection through `args.sizes`, measuring at each; results[size] as it goes."""
    coll = Collection(pg, settings, model)
    try:
        embedder, state, docs = TimedEmbedder(model), {"chunks": 0, "docs": 0}, documents(args.seed, pool)
        for size in args.sizes:
            say(f"ingesting up to {size:,} chunks")
            ingestion = ingest_until(size, coll, embedder, settings, docs, state, f"{size // 1000}k")
            say(f"measuring at {state['chunks']:,} chunks")
            measured = measure(coll, model, queries, vectors, args, settings, verify=size == args.sizes[0])
            results[size] = {"chunks": state["chunks"], "docs": state["docs"], "ingestion": ingestion,
                             **measured}
    finally:
        coll.close()


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m ops.rag_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a short check (a few minutes): --sizes 2000,4000 --queries 40 --rounds 1, tables "
                        "printed, docs/bench left alone (unless --write)")
    p.add_argument("--sizes", default=None,
                   help="comma list of collection sizes in chunks (default 10000,100000; quick 2000,4000)")
    p.add_argument("--queries", type=int, default=None, help="queries (default 100; quick 40)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed passes over the queries per mode (default 2; quick 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed queries per mode first (default 10)")
    p.add_argument("--ef", default="10,20,40,80,160,320",
                   help="ef_search values of the recall sweep (the settings' own is always added)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-write", action="store_true", help="print the tables only; leave docs/bench alone")
    p.add_argument("--write", action="store_true", help="with --quick: write docs/bench all the same")
    p.add_argument("--keep-folder", action="store_true",
                   help="keep the working folder (Postgres data and log)")
    p.add_argument("--save-results", metavar="PATH", help="also write every number measured as JSON to PATH")
    args = p.parse_args(argv)
    sizes = args.sizes or ("2000,4000" if args.quick else "10000,100000")
    args.sizes = sorted(int(s) for s in sizes.split(","))
    args.queries = args.queries or (40 if args.quick else 100)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.ef = [int(e) for e in args.ef.split(",")]
    args.no_write = args.no_write or (args.quick and not args.write)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    # A SIGTERM unwinds like Ctrl-C, through the finally block that stops Postgres and removes the folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.no_write:
        import matplotlib  # noqa: F401 - fail now, not after the run: `pip install -e '.[bench]'`
    import torch

    from ops import rag_report
    from ops.rag_corpus import load_pool
    from ops.services import EmbeddedPostgres, free_port
    from tasks.ingest.task import settings_embedder
    from tasks.settings import Settings

    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    settings = Settings.from_env()
    model = settings_embedder(settings)
    model.load()
    pool = load_pool()
    queries = make_queries(random.Random(f"{args.seed}-queries"), pool, args.queries)
    vectors = model.embed_queries(queries)
    facts = {"load_start": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
             "pool_sentences": len(pool.sentences), "pool_headings": len(pool.headings),
             "pool_themes": len(pool.themes), "query_embedding": query_embedding(model, queries)}
    say(f"prose pool: {len(pool.sentences):,} sentences, {len(pool.headings)} headings; "
        f"{len(queries)} queries (one embedded in {facts['query_embedding']['p50']:.1f} ms p50)")
    results: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-rag-bench-"))
    say(f"working folder {workdir}; sizes {', '.join(f'{s:,}' for s in args.sizes)} chunks")
    pg = None
    try:
        pg = EmbeddedPostgres(workdir / "pg", free_port())
        pg.start()
        facts.update(postgres_facts(pg))
        run_sizes(pg, model, pool, queries, vectors, args, settings, results)
    finally:
        if pg is not None:
            stop_postgres(pg)
        if args.keep_folder:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if workdir.exists():
                say(f"warning: could not remove {workdir}")
        say("Postgres stopped" + ("" if args.keep_folder else ", working folder removed"))
    minutes = (time.monotonic() - t0) / 60
    facts["load_end"] = os.getloadavg()[0]
    if args.save_results:
        saved = {"facts": facts, "results": results}
        Path(args.save_results).write_text(json.dumps(saved, indent=1, default=str))
    if not args.no_write:
        shown = [a for a, prev in zip(argv, [None] + argv) if "--save-results" not in (a.split("=")[0], prev)]
        command = "python -m ops.rag_bench" + (" " + shlex.join(shown) if shown else "")
        rag_report.write(results, facts, settings, args, started, minutes, command)
    print()
    print(rag_report.tables(results, settings))
    print(f"\nwrote {DOCS / 'retrieval.md'} and {DOCS / 'retrieval.png'} ({minutes:.1f} minutes)"
          if not args.no_write else f"\n({minutes:.1f} minutes)")


def query_embedding(model, queries: list[str]) -> dict:
    """p50/p95 of embedding one query alone (what search.search pays before its SQL)."""
    seconds = []
    for q in queries:
        start = time.perf_counter()
        model.embed_queries([q])
        seconds.append(time.perf_counter() - start)
    return _summary(seconds)


def postgres_facts(pg) -> dict:
    import psycopg

    with psycopg.connect(pg.url) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('shared_buffers'), "
            "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector')").fetchone()
    return {"postgres": row[0], "shared_buffers": row[1], "pgvector": row[2]}


if __name__ == "__main__":
    main()
