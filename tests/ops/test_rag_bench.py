"""The retrieval benchmark's bookkeeping (ops/rag_bench.py, ops/rag_corpus.py, ops/rag_report.py),
without running it: how recall counts ties, the synthetic documents, and the recall table's marks."""

from __future__ import annotations

import random

from ops import rag_corpus, rag_report
from ops.rag_bench import recall_at_k
from retrieval import parsing


def test_recall_counts_the_exact_neighbours_found():
    exact = [(i, 1 - i / 100) for i in range(10)]
    assert recall_at_k(exact, exact) == 1.0
    found = exact[:7] + [(50, 0.5), (51, 0.4), (52, 0.3)]
    assert recall_at_k(found, exact) == 0.7
    assert recall_at_k([], exact) == 0.0


def test_a_tie_with_the_tenth_neighbour_is_a_right_answer():
    """Two chunks as close as the exact 10th: either one is a right 10th answer."""
    exact = [(i, 0.9) for i in range(9)] + [(9, 0.5)]
    assert recall_at_k(exact[:9] + [(99, 0.5)], exact) == 1.0
    assert recall_at_k(exact[:9] + [(99, 0.4999)], exact) == 0.9


def test_recall_over_a_collection_smaller_than_k():
    exact = [(1, 0.9), (2, 0.8)]
    assert recall_at_k([(1, 0.9), (2, 0.8)], exact) == 1.0
    assert recall_at_k([(1, 0.9)], exact) == 0.5


def test_synthetic_documents_are_seeded_markdown_made_of_pool_sentences():
    pool = rag_corpus.load_pool()
    assert len(pool.sentences) >= 500 and len(set(pool.sentences)) == len(pool.sentences)
    known = set(pool.sentences)
    first = [rag_corpus.synth_document(random.Random(3), pool) for _ in range(2)]
    assert first[0] == first[1]
    rng = random.Random(4)
    for _ in range(20):
        title, content = rag_corpus.synth_document(rng, pool)
        doc = parsing.parse(content, parsing.MARKDOWN)
        assert doc.title == title
        body = [b for b in doc.blocks if b.kind != "heading"]
        assert body and all(len(b.heading_path) == 2 for b in body)  # the title, then a section
        sentences = [s for b in body for s in rag_corpus._SENTENCE.findall(b.text)]
        assert set(sentences) <= known and len(set(sentences)) == len(sentences)


def test_the_recall_table_marks_the_default_and_the_forced_index():
    def sweep(chosen_at_80: bool):
        cell = {"recall": 0.97, "p50": 1.5, "index_chosen": True}
        forced = {**cell, "recall": 0.99, "index_chosen": chosen_at_80}
        return {"exact": {"p50": 7.0}, "ef": {40: cell, 80: forced}}

    results = {2000: {"chunks": 2001, "recall": sweep(False)}, 4000: {"chunks": 4003, "recall": sweep(True)}}
    rows = rag_report.recall_table(results, 40).splitlines()
    assert rows[0].startswith("| ef_search | recall@10, 2,001 | p50 (ms) | recall@10, 4,003 |")
    assert rows[2] == "| **40** (default) | 0.970 | 1.50 | 0.970 | 1.50 |"
    assert rows[3] == "| 80 | 0.990 † | 1.50 | 0.990 | 1.50 |"
    assert rows[4] == "| exact (sequential scan) | 1 | 7.0 | 1 | 7.0 |"
