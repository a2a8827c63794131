"""Search a tenant's collections: `vector` (HNSW, cosine), `keyword` (full text) or `hybrid` (both,
fused by reciprocal rank as pgvector-python's hybrid example does, k = 60).

Only chunks of `ready` documents are read, and every statement is scoped to the tenant in SQL (the
collection ids were checked against the tenant first, and the chunk rows carry the tenant too).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from psycopg import sql
from psycopg.rows import dict_row

from retrieval import store
from retrieval.embedding import check_model

MODES = ("vector", "keyword", "hybrid")
RRF_K = 60  # the constant of reciprocal rank fusion: score = sum of 1 / (RRF_K + rank)
# The HNSW candidate list per query. pgvector's default, 40, found 0.914 of the exact 10 nearest chunks
# at 10k chunks and 0.856 at 100k in `make bench-rag` (docs/bench/retrieval.md); 320 found 0.992 and
# 0.965 for 4.4 and 15.5 ms of SQL (p50). Quality first: 320, unless SWITCHYARD_HNSW_EF_SEARCH says less.
DEFAULT_EF_SEARCH = 320
# An iterative scan stops once it has k rows; this bounds the work when a filter matches almost
# nothing. A filter matching a fraction f of a collection needs about k / f tuples: 20 000 (pgvector's
# default) covers k = 10 down to f = 0.05 %.
DEFAULT_MAX_SCAN_TUPLES = 20_000

_HIT = """c.id AS chunk_id, c.document_id, c.collection_id, d.title, c.ordinal, c.text, c.char_start,
          c.char_end, c.page, c.heading_path, c.metadata"""


@dataclass(frozen=True)
class Hit:
    """One chunk found: `score` orders the results of its mode (cosine similarity, ts_rank_cd, or the
    fused RRF score); `scores` holds each mode's own score and rank where it had one."""

    chunk_id: int
    document_id: uuid.UUID
    collection_id: uuid.UUID
    title: str
    ordinal: int
    text: str
    char_start: int
    char_end: int
    page: int | None
    heading_path: list[str]
    metadata: dict
    score: float
    scores: dict = field(default_factory=dict)


def search(conn, embedder, tenant_id, collection_ids, query: str, k: int = 5, mode: str = "hybrid",
           filter: dict | None = None, *, ef_search: int = DEFAULT_EF_SEARCH,
           max_scan_tuples: int = DEFAULT_MAX_SCAN_TUPLES) -> list[Hit]:
    """The k best chunks for `query` in the tenant's `collection_ids`. `filter` is a JSON object the
    chunk's metadata (the document's, plus `page`) must contain."""
    return search_many(conn, embedder, tenant_id, collection_ids, [query], k, mode, filter,
                       ef_search=ef_search, max_scan_tuples=max_scan_tuples)[0]


def search_many(conn, embedder, tenant_id, collection_ids, queries: list[str], k: int = 5,
                mode: str = "hybrid", filter: dict | None = None, *, ef_search: int = DEFAULT_EF_SEARCH,
                max_scan_tuples: int = DEFAULT_MAX_SCAN_TUPLES) -> list[list[Hit]]:
    """`search` for queries that arrived together: their embeddings are computed in one call.
    Raises NotFound for a collection the tenant does not have, ModelMismatch for another model's."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if k < 1:
        raise ValueError("k must be at least 1")
    collections = store.get_collections(conn, tenant_id, collection_ids)
    vectors = [None] * len(queries)
    if mode != "keyword":
        for collection in collections:
            check_model(embedder, collection)
        vectors = embedder.embed_queries(list(queries))
    scope = _Scope(tenant_id, collections, filter, ef_search, max_scan_tuples)
    return [_search_one(conn, scope, q, v, k, mode) for q, v in zip(queries, vectors)]


@dataclass(frozen=True)
class _Scope:
    tenant_id: object
    collections: list
    filter: dict | None
    ef_search: int
    max_scan_tuples: int


def _search_one(conn, scope: _Scope, query: str, vector, k: int, mode: str) -> list[Hit]:
    if mode == "vector":
        return vector_hits(conn, scope, vector, k)
    if mode == "keyword":
        return keyword_hits(conn, scope, query, k)
    candidates = max(2 * k, 20)  # each list feeds the fusion more than k, as pgvector-python's does
    return fuse(vector_hits(conn, scope, vector, candidates), keyword_hits(conn, scope, query, candidates), k)


def fuse(vector: list[Hit], keyword: list[Hit], k: int) -> list[Hit]:
    """Reciprocal rank fusion: a chunk scores 1/(60 + rank) in each list it appears in."""
    fused: dict[int, tuple[float, Hit, dict]] = {}
    for name, hits in (("vector", vector), ("keyword", keyword)):
        for rank, hit in enumerate(hits, start=1):
            score, first, scores = fused.get(hit.chunk_id, (0.0, hit, {}))
            scores |= {name: hit.score, f"{name}_rank": rank}
            fused[hit.chunk_id] = (score + 1.0 / (RRF_K + rank), first, scores)
    # Exact ties are common with two lists (ranks 1 and 2 against 2 and 1): they go to the chunk
    # closer in meaning (the dense score), then to the earlier chunk.
    ranked = sorted(fused.values(), key=lambda t: (-t[0], -t[2].get("vector", -2.0), t[1].chunk_id))[:k]
    return [_with_score(hit, score, scores | {"rrf": score}) for score, hit, scores in ranked]


def _with_score(hit: Hit, score: float, scores: dict) -> Hit:
    return Hit(**{**hit.__dict__, "score": score, "scores": scores})


def _filter_sql(scope: _Scope) -> tuple[sql.Composable, list]:
    if not scope.filter:
        return sql.SQL(""), []
    return sql.SQL("AND c.metadata @> %s::jsonb"), [json.dumps(scope.filter)]


def vector_hits(conn, scope: _Scope, vector, limit: int) -> list[Hit]:
    """Nearest chunks by cosine distance, per collection through its own HNSW index, merged.
    The collection id and dimension are literals so the planner can match the partial expression index;
    the iterative scan keeps walking the graph until `limit` rows pass the filters (pgvector 0.8).
    relaxed_order may return rows slightly out of order, hence the materialized CTE re-sorted outside."""
    hits: list[Hit] = []
    where, params = _filter_sql(scope)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT set_config('hnsw.ef_search', %s, true), "
                    "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                    "set_config('hnsw.max_scan_tuples', %s, true)",
                    (str(scope.ef_search), str(scope.max_scan_tuples)))
        for collection in scope.collections:
            distance = sql.SQL("(c.embedding::vector({dim})) <=> %s::vector({dim})").format(
                dim=sql.Literal(collection.embedding_dim))
            query = sql.SQL("""
                WITH nearest AS MATERIALIZED (
                    SELECT c.id, {distance} AS distance
                      FROM chunks c
                     WHERE c.collection_id = {collection} AND c.tenant_id = %s {where}
                       AND EXISTS (SELECT 1 FROM documents d WHERE d.id = c.document_id AND d.status = 'ready')
                     ORDER BY {distance}
                     LIMIT %s)
                SELECT {hit}, 1 - n.distance AS score
                  FROM nearest n JOIN chunks c ON c.id = n.id JOIN documents d ON d.id = c.document_id
                 ORDER BY n.distance, c.id""").format(
                distance=distance, collection=sql.Literal(str(collection.id)), where=where, hit=sql.SQL(_HIT))
            v = store.vector_literal(vector)
            rows = cur.execute(query, [v, scope.tenant_id, *params, v, limit]).fetchall()
            hits += [Hit(**r, scores={"vector": r["score"]}) for r in rows]
    return sorted(hits, key=lambda h: (-h.score, h.chunk_id))[:limit]


# websearch_to_tsquery ANDs the words, so a question in plain words ("when was the bridge built")
# would need every word in one chunk. Its ANDs become ORs (negated terms stay ANDed), and ts_rank_cd
# ranks chunks covering more of the query, closer together, first. Quotes still make phrases.
_KEYWORD = sql.SQL("""
    SELECT {hit}, ts_rank_cd(c.tsv, q.query) AS score
      FROM chunks c JOIN documents d ON d.id = c.document_id AND d.status = 'ready',
           (SELECT regexp_replace(websearch_to_tsquery('english', %s)::text, ' & (?!!)', ' | ', 'g')::tsquery)
               AS q (query)
     WHERE c.tenant_id = %s AND c.collection_id = ANY(%s) AND c.tsv @@ q.query {where}
     ORDER BY score DESC, c.id
     LIMIT %s""")


def keyword_hits(conn, scope: _Scope, query: str, limit: int) -> list[Hit]:
    """Chunks matching the query's words (English stemming), best ts_rank_cd first."""
    where, params = _filter_sql(scope)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_KEYWORD.format(hit=sql.SQL(_HIT), where=where),
                           [query, scope.tenant_id, [c.id for c in scope.collections], *params, limit]).fetchall()
    return [Hit(**r, scores={"keyword": r["score"]}) for r in rows]
