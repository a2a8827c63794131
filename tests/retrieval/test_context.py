"""Numbered context within the generation model's token budget, with citations."""

from __future__ import annotations

import uuid

import pytest

from retrieval.context import build_context
from retrieval.search import Hit


@pytest.fixture(scope="module")
def generation_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _hit(i: int, words: int) -> Hit:
    text = " ".join(f"word{i}-{j}" for j in range(words))
    return Hit(chunk_id=i, document_id=uuid.uuid4(), collection_id=uuid.uuid4(), title=f"Doc {i}", ordinal=0,
               text=text, char_start=100 * i, char_end=100 * i + len(text), page=None, heading_path=[],
               metadata={}, score=1.0 / (i + 1))


def _tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_everything_fits_numbered_in_order(generation_tokenizer):
    hits = [_hit(i, 10) for i in range(3)]
    ctx = build_context(hits, generation_tokenizer, 2048)
    assert [c.n for c in ctx.citations] == [1, 2, 3]
    assert [c.chunk_id for c in ctx.citations] == [0, 1, 2]
    assert ctx.text.startswith("[1] Doc 0\nword0-0") and "\n\n[3] Doc 2\n" in ctx.text
    assert ctx.citations[1].char_end == hits[1].char_end and not ctx.citations[1].truncated


@pytest.mark.parametrize("budget", [60, 150, 333, 500])
def test_the_budget_is_never_exceeded(generation_tokenizer, budget):
    hits = [_hit(i, 60) for i in range(8)]
    ctx = build_context(hits, generation_tokenizer, budget)
    assert ctx.tokens == _tokens(generation_tokenizer, ctx.text) <= budget
    assert [c.n for c in ctx.citations] == list(range(1, len(ctx.citations) + 1))
    for c in ctx.citations:
        assert f"[{c.n}] " in ctx.text
        hit = hits[c.chunk_id]
        assert hit.text.startswith(c.snippet) and hit.char_start <= c.char_end <= hit.char_end
    last = ctx.citations[-1]
    if last.truncated:
        assert ctx.text.endswith(" …") and last.char_end < hits[last.chunk_id].char_end


def test_nothing_fits(generation_tokenizer):
    ctx = build_context([_hit(0, 200)], generation_tokenizer, 10)
    assert (ctx.text, ctx.citations, ctx.tokens) == ("", [], 0)
