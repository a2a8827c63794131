"""Chunks within the embedding model's budget, following the structure, with overlap and exact offsets."""

from __future__ import annotations

from retrieval import parsing
from retrieval.chunking import chunk_document
from tests.retrieval.support import make_pdf

SENTENCES = [f"Fact number {i} says that the {w} of station {i * 7} is recorded daily." for i, w in
             enumerate(["pressure", "temperature", "humidity", "wind", "rainfall"] * 12)]


def _doc(markdown: str):
    return parsing.parse(markdown.encode(), parsing.MARKDOWN)


def test_no_chunk_exceeds_the_models_input_and_offsets_map_back(embedder):
    long_paragraph = " ".join(SENTENCES)
    unbroken = "x" * 3000  # one "sentence" with no end: cut into token windows
    doc = _doc(f"# Stations\n\n## Readings\n\n{long_paragraph}\n\nShort one.\n\n## Noise\n\n{unbroken}\n")
    chunks = chunk_document(doc, embedder.tokenizer, max_tokens=200, overlap=32)
    assert len(chunks) > 4
    for c in chunks:
        assert doc.text[c.char_start:c.char_end] == c.text
        seen = embedder.count_tokens(c.embed_text)
        assert seen == c.tokens and seen <= 200 <= embedder.max_tokens
        assert c.embed_text.startswith(" > ".join(c.heading_path))
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert {c.heading_path for c in chunks} == {("Stations", "Readings"), ("Stations", "Noise")}


def test_overlap_is_honoured_within_a_section(embedder):
    doc = _doc("# Log\n\n" + " ".join(SENTENCES) + "\n")
    chunks = chunk_document(doc, embedder.tokenizer, max_tokens=120, overlap=32)
    assert len(chunks) >= 4
    for a, b in zip(chunks, chunks[1:]):
        assert b.char_start < a.char_end, "consecutive chunks of one section share text"
        assert b.char_start > a.char_start, "and still move forward"
        shared = doc.text[b.char_start:a.char_end]
        assert 0 < embedder.count_tokens(shared) - 2 <= 32
    no_overlap = chunk_document(doc, embedder.tokenizer, max_tokens=120, overlap=0)
    assert all(b.char_start >= a.char_end for a, b in zip(no_overlap, no_overlap[1:]))


def test_chunks_never_cross_headings_or_pages(embedder):
    doc = _doc("# A\n\nalpha text.\n\n# B\n\nbeta text.\n")
    assert [(c.text, c.heading_path) for c in chunk_document(doc, embedder.tokenizer)] == [
        ("alpha text.", ("A",)), ("beta text.", ("B",))]
    pdf = parsing.parse(make_pdf([["page one words"], ["page two words"]]), parsing.PDF)
    assert [(c.page, c.text) for c in chunk_document(pdf, embedder.tokenizer)] == [
        (1, "page one words"), (2, "page two words")]
