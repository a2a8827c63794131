"""Retrieval quality on a labelled corpus: recall@5, MRR and nDCG@10 for each search mode.

tests/data/corpus holds short factual documents about a fictional region (.md, .txt, .html) and
tests/data/questions.jsonl questions, each with the document and the passage that answers it. A hit is
relevant when it comes from that document and its text contains the passage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval import parsing, store
from retrieval.ingestion import ingest_document
from retrieval.search import MODES, search_many
from tests.retrieval.support import ndcg_at, recall_at, reciprocal_rank

DATA = Path(__file__).resolve().parents[1] / "data"


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def questions():
    return [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]


def test_retrieval_quality_per_mode(conn, tenant, collection, embedder, questions):
    files = sorted((DATA / "corpus").iterdir())
    assert len(files) >= 30 and len(questions) >= 40
    ids = {}
    for path in files:
        doc, _ = store.add_document(conn, tenant[0].id, collection.id, path.read_bytes(), title=path.stem,
                                    content_type=parsing.content_type_for(path.name), source_filename=path.name)
        assert ingest_document(conn, embedder, tenant[0].id, doc["id"])["status"] == "ready"
        ids[path.name] = doc["id"]
    rows = conn.execute("SELECT document_id, text FROM chunks WHERE collection_id = %s", (collection.id,)).fetchall()
    texts = [q["question"] for q in questions]
    table = {}
    for mode in MODES:
        results = search_many(conn, embedder, tenant[0].id, [collection.id], texts, k=10, mode=mode)
        scores = {"recall@5": [], "MRR": [], "nDCG@10": []}
        for q, hits in zip(questions, results):
            answers = lambda doc_id, text: doc_id == ids[q["document"]] and _norm(q["passage"]) in _norm(text)
            relevant = [answers(h.document_id, h.text) for h in hits]
            total = sum(answers(r["document_id"], r["text"]) for r in rows)
            assert total >= 1, f"no chunk holds the passage of {q['question']!r}"
            scores["recall@5"].append(recall_at(relevant, 5))
            scores["MRR"].append(reciprocal_rank(relevant))
            scores["nDCG@10"].append(ndcg_at(relevant, 10, total))
        table[mode] = {name: sum(v) / len(v) for name, v in scores.items()}
    print(f"\nretrieval quality: {len(files)} documents, {len(rows)} chunks, {len(questions)} questions")
    print(f"{'mode':<8} {'recall@5':>9} {'MRR':>7} {'nDCG@10':>8}")
    for mode, m in table.items():
        print(f"{mode:<8} {m['recall@5']:>9.3f} {m['MRR']:>7.3f} {m['nDCG@10']:>8.3f}")
    hybrid = table["hybrid"]
    assert hybrid["recall@5"] >= 0.9
    for mode in ("vector", "keyword"):
        for metric, value in hybrid.items():
            assert value >= table[mode][metric], f"hybrid {metric} below {mode}: {table}"
