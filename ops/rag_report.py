"""The retrieval benchmark's report (ops/rag_bench.py): its tables, plot and docs/bench/retrieval.md.

`results` maps each size (the target, in chunks) to what was measured when the collection reached it.
"""

from __future__ import annotations

from ops.bench import DOCS, machine

MODES = ("vector", "keyword", "hybrid")
RECALL_TARGET = 0.95  # the target for recall@10 at the default ef_search


def ingestion_table(results: dict) -> str:
    lines = ["| chunks | documents | seconds | chunks/s | documents/s | model's share |",
             "|---|---:|---:|---:|---:|---:|"]
    for size in sorted(results):
        i = results[size]["ingestion"]
        lines.append(f"| {i['from']:,} → {i['to']:,} | {i['docs']:,} | {i['seconds']:.0f} | "
                     f"{i['chunks_s']:.1f} | {i['docs_s']:.2f} | {i['model_seconds'] / i['seconds']:.0%} |")
    return "\n".join(lines)


def latency_table(results: dict) -> str:
    lines = ["| chunks | mode | p50 (ms) | p95 (ms) | SQL p50 (ms) | SQL p95 (ms) |",
             "|---:|---|---:|---:|---:|---:|"]
    for size in sorted(results):
        r = results[size]
        for mode in MODES:
            t, s = r["latency"][mode]["total"], r["latency"][mode]["sql"]
            lines.append(f"| {r['chunks']:,} | {mode} | {t['p50']:.1f} | {t['p95']:.1f} | {s['p50']:.1f} | "
                         f"{s['p95']:.1f} |")
    return "\n".join(lines)


def recall_table(results: dict, default_ef: int) -> str:
    sizes = sorted(results)
    head = " | ".join(f"recall@10, {results[s]['chunks']:,} | p50 (ms)" for s in sizes)
    lines = [f"| ef_search | {head} |", "|---|" + "---:|---:|" * len(sizes)]
    for ef in sorted(results[sizes[0]]["recall"]["ef"]):
        cells = []
        for s in sizes:
            e = results[s]["recall"]["ef"][ef]
            cells.append("— | —" if e is None else
                         f"{e['recall']:.3f}{'' if e['index_chosen'] else ' †'} | {e['p50']:.2f}")
        name = f"**{ef}** (default)" if ef == default_ef else str(ef)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    exact = " | ".join(f"1 | {results[s]['recall']['exact']['p50']:.1f}" for s in sizes)
    lines.append(f"| exact (sequential scan) | {exact} |")
    return "\n".join(lines)


def tables(results: dict, settings) -> str:
    if not results:
        return "(nothing measured)"
    return "\n\n".join([ingestion_table(results), latency_table(results),
                        recall_table(results, settings.hnsw_ef_search)])


def plot(results: dict, default_ef: int, path, title: str) -> None:
    """Left: search latency p50 (solid, labelled) and p95 (pale, behind) per mode at each size, log scale.
    Right: recall@10 against ef_search at each size, with the target and the default ef_search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    sizes = sorted(results)
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    width = 0.8 / len(sizes)
    for j, size in enumerate(sizes):
        lat, label = results[size]["latency"], f"{results[size]['chunks']:,} chunks"
        xs = [m + (j - (len(sizes) - 1) / 2) * width for m in range(len(MODES))]
        left.bar(xs, [lat[m]["total"]["p95"] for m in MODES], width, color=colours[j], alpha=0.35)
        p50 = [lat[m]["total"]["p50"] for m in MODES]
        bars = left.bar(xs, p50, width, color=colours[j], label=label)
        left.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in p50], fontsize=8,
                       padding=1)
    left.set_yscale("log")
    left.yaxis.set_major_formatter(ScalarFormatter())
    left.yaxis.set_minor_formatter(ScalarFormatter())
    left.tick_params(axis="y", which="minor", labelsize=7)
    left.set_xticks(range(len(MODES)), MODES)
    left.set_ylabel("search.search latency, ms (p50 solid, p95 pale)")
    left.legend(fontsize=8, loc="upper left")
    left.grid(axis="y", alpha=0.3, which="both")
    left.set_axisbelow(True)
    efs = sorted(results[sizes[0]]["recall"]["ef"])
    forced_label = "planner prefers a sequential scan there (index forced)"
    for j, size in enumerate(sizes):
        sweep = {e: v for e, v in results[size]["recall"]["ef"].items() if v is not None}
        right.plot(sorted(sweep), [sweep[e]["recall"] for e in sorted(sweep)], marker="o", color=colours[j],
                   label=f"{results[size]['chunks']:,} chunks")
        forced = [e for e in sorted(sweep) if not sweep[e]["index_chosen"]]
        if forced:
            right.plot(forced, [sweep[e]["recall"] for e in forced], marker="o", markerfacecolor="white",
                       color=colours[j], linestyle="none", label=forced_label)
            forced_label = None
    right.axhline(RECALL_TARGET, color="grey", linestyle="--", linewidth=1)
    right.text(efs[0], RECALL_TARGET + 0.002, f"target {RECALL_TARGET}", fontsize=8, color="grey",
               va="bottom")
    right.axvline(default_ef, color="grey", linestyle=":", linewidth=1)
    right.set_xscale("log", base=2)
    right.set_xticks(efs, [str(e) for e in efs])
    right.set_xlabel(f"hnsw.ef_search (dotted: the default, {default_ef})")
    right.set_ylabel("HNSW recall@10 against exact search")
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, facts: dict, settings, args, started, minutes: float, command: str) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    m = machine()
    plot(results, settings.hnsw_ef_search, DOCS / "retrieval.png",
         f"Switchyard retrieval: all-MiniLM-L6-v2 (384 dims), HNSW m={settings.hnsw_m}, "
         f"ef_construction={settings.hnsw_ef_construction}, k=10 ({m['cores']} cores, {started:%Y-%m-%d})")
    (DOCS / "retrieval.md").write_text(_text(results, facts, settings, args, started, minutes, command, m))


def _text(results, facts, settings, args, started, minutes, command, m) -> str:
    ef = settings.hnsw_ef_search
    sizes = sorted(results)
    big = results[sizes[-1]]
    checks = " ".join(f"Exactness: at {r['chunks']:,} chunks the exact search agreed with numpy's brute "
                      f"force over the {r['exact_check']['rows']:,} vectors read back on "
                      f"{r['exact_check']['agree']} of {r['exact_check']['queries']} queries."
                      for r in (results[s] for s in sizes) if "exact_check" in r)
    plans_ok = all(r["hnsw_used"] and r["exact_without_index"] for r in results.values())
    at_default = ", ".join(f"**{results[s]['recall']['ef'][ef]['recall']:.3f}** at "
                           f"{results[s]['chunks']:,} chunks" for s in sizes)
    storage = "; ".join(f"{r['chunks']:,} chunks: chunks table {r['sizes']['chunks_table']}, "
                        f"HNSW index {r['sizes']['hnsw_index']}" for r in (results[s] for s in sizes))
    return f"""# Retrieval benchmark

Command: `{command}` (what `make bench-rag` runs; `make bench-rag BENCH_ARGS=--quick` is a check of a few
minutes that prints its tables and leaves these files alone). Run {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f}
minutes. Machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['os']}; torch on
{facts['torch_threads']} threads; load average {facts['load_start']:.1f} at the start and
{facts['load_end']:.1f} at the end (the machine was shared with other work). PostgreSQL
{facts['postgres']} with pgvector
{facts['pgvector']}, embedded, default settings (shared_buffers {facts['shared_buffers']}). The service's
settings as shipped: all-MiniLM-L6-v2 (384 dimensions) on the CPU; chunks of {settings.chunk_tokens} tokens
with {settings.chunk_overlap} of overlap, embedded {settings.embedding_batch_size} at a time; HNSW m =
{settings.hnsw_m}, ef_construction = {settings.hnsw_ef_construction}, ef_search = {ef}.

One collection grows through the sizes; every chunk in it was embedded by the model through the
ingestion path. The documents are synthetic, recombined from the project's own prose (see below).

## Ingestion

{ingestion_table(results)}

Through the real path, one document at a time, as one ingest-worker thread: `store.add_document`, then
`ingestion.ingest_document` (parse, chunk, embed, insert with the HNSW and full-text indexes maintained,
mark ready). **model's share**: the part of that time spent in the model's forward passes.

## Search latency

{latency_table(results)}

`search.search` with k = 10 and ef_search = {ef}, the whole call: it reads the collection, embeds the
query (vector and hybrid: the model, {facts['query_embedding']['p50']:.1f} ms p50 for one query) and runs
the SQL. **SQL** is the same search with the query's vector computed beforehand. {args.queries} queries
(the {min(args.queries, 56)} questions of tests/data/questions.jsonl, then runs of 3–8 words cut from the
pool's sentences), {args.rounds} timed round(s) each, after {args.warmup} untimed ones per mode. Keyword
and hybrid OR the query's words (see retrieval/search.py), so a common word matches many chunks.

![search latency per mode and recall against ef_search](retrieval.png)

## HNSW recall@10

{recall_table(results, ef)}

At the default ef_search = {ef} (target ≥ {RECALL_TARGET}): {at_default}. Each cell: the mean over the
{args.queries} queries of the share of the exact 10 nearest chunks that `search.vector_hits` returned (a
hit exactly as close as the 10th counts), and the p50 of that query. Exact = the same statement with
`SET LOCAL enable_indexscan = off`, a sequential scan over the collection; its p50 is the last row.
† marks where the planner, left alone, prefers a sequential scan to the HNSW index (pgvector's cost
estimate grows with ef_search, and a small collection is cheap to scan whole): the service then gets
exact results at about the exact row's latency. To measure the index there all the same, those cells
ran with `enable_seqscan`, `enable_bitmapscan` and `enable_sort` off (the plan checked to use the
index); "—" where even that did not make the planner take it. Open markers in the plot. {checks}

Plans, read with auto_explain from the statement `vector_hits` runs: HNSW index used by the vector
search at the default ef_search, and not by the exact search, at every size:
**{'yes' if plans_ok else 'NO'}**.
At {big['chunks']:,} chunks, the vector search (the query's vector shown as […]):

```
{big['hnsw_plan']}
```

Sizes after VACUUM ANALYZE: {storage}.

## How the data was made

Synthetic Markdown documents (ops/rag_corpus.py, seed {args.seed}), each a title and 3–6 sections under
headings of the corpus or README, of 2–4 paragraphs of 2–5 sentences, from a pool of
{facts['pool_sentences']:,} distinct sentences and {facts['pool_headings']} headings of the project's own
prose:
tests/data/corpus, README.md, and the docstrings and comments of its modules and migrations. Nothing
is downloaded. Each sentence of a document comes with even odds from its theme (one source file, of
{facts['pool_themes']}) or from the whole pool; none repeats within a document, but across
{big['chunks']:,} chunks each pool sentence recurs in hundreds of them, so many chunks are near
neighbours of each other (a harder case for approximate search than distinct text), and a keyword
search matches more chunks than it would in a corpus that size of distinct text. Every chunk, and
every query, is embedded by the model. (While this benchmark was written, composing chunk vectors from
the model's sentence vectors, to save its time, was tried and dropped: such vectors were much harder
for HNSW than real ones, recall@10 0.80 against 0.97 at 2 000 chunks, so they would misstate recall.
This command does not re-run that comparison.)

Before measuring at each size: VACUUM ANALYZE of chunks and documents. These are single runs on a
shared 2-core machine; the p95 values in particular move with whatever else runs on it.
"""
