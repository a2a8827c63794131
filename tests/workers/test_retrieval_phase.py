"""The retrieval phase's prompt assembly and budget (no Postgres: hits are made here, the search is
stubbed), and the batch core carrying a RAG job's citations into its result."""

from __future__ import annotations

import uuid

import pytest

from retrieval.errors import ModelMismatch, NotFound
from retrieval.search import Hit
from tasks.errors import ErrorKind
from tasks.prompting import load_tokenizer, prompt_token_ids
from workers import retrieval_phase
from workers.batch import BatchCore
from workers.retrieval_phase import NOTHING_FOUND, RetrievalPhase, augment, query_of
from workers.simulated import SimulatedEngine

MAX_MODEL_LEN = 2048
RAG = {"collections": [str(uuid.uuid4())], "top_k": 5, "mode": "hybrid", "filter": None}


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


def hit(text: str, n: int = 1, score: float = 0.9) -> Hit:
    return Hit(chunk_id=n, document_id=uuid.uuid4(), collection_id=uuid.uuid4(), title=f"doc {n}", ordinal=0,
               text=text, char_start=100 * n, char_end=100 * n + len(text), page=None, heading_path=[], metadata={},
               score=score)


def chat(content="What colour is the Zorblax?", max_tokens=256, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "rag": RAG, **extra}


def test_the_query_is_the_last_user_message_or_the_prompt():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"}]
    assert query_of({"messages": messages}) == "second"
    assert query_of({"prompt": "plain"}) == "plain"


def test_chat_gets_numbered_passages_in_a_system_message(tokenizer):
    hits = [hit("The Zorblax is bright teal.", 1), hit("Bridges are made of steel.", 2)]
    request, extra = augment(chat(), hits, tokenizer, MAX_MODEL_LEN)
    assert "rag" not in request
    system, user = request["messages"]
    assert system["role"] == "system" and user["content"] == "What colour is the Zorblax?"
    assert "[1] doc 1\nThe Zorblax is bright teal." in system["content"]
    assert "[2] doc 2" in system["content"] and "[n]" in system["content"]
    assert [c["n"] for c in extra["citations"]] == [1, 2]
    first = extra["citations"][0]
    assert first["document_id"] == str(hits[0].document_id) and first["chunk_id"] == 1
    assert first["title"] == "doc 1" and first["score"] == 0.9 and first["snippet"] == "The Zorblax is bright teal."
    assert (first["char_start"], first["char_end"]) == (100, 100 + len(hits[0].text))
    assert extra["retrieval"]["found"] == 2 and extra["retrieval"]["used"] == 2


def test_an_existing_system_message_is_kept_and_extended(tokenizer):
    request = chat()
    request["messages"].insert(0, {"role": "system", "content": "Be terse."})
    augmented, _ = augment(request, [hit("fact")], tokenizer, MAX_MODEL_LEN)
    assert len(augmented["messages"]) == 2
    assert augmented["messages"][0]["content"].startswith("Be terse.\n\n") and "[1] doc 1" in augmented["messages"][0]["content"]


def test_a_plain_prompt_gets_a_preamble(tokenizer):
    request = {"prompt": "Q: What colour is the Zorblax?\nA:", "max_tokens": 16, "rag": RAG}
    augmented, extra = augment(request, [hit("The Zorblax is bright teal.")], tokenizer, MAX_MODEL_LEN)
    assert augmented["prompt"].endswith("Q: What colour is the Zorblax?\nA:")
    assert augmented["prompt"].index("[1] doc 1") < augmented["prompt"].index("Q: What")
    assert len(extra["citations"]) == 1


@pytest.mark.parametrize("max_tokens", [1, 256, 1500, 1900])
def test_a_huge_retrieved_context_never_overflows_the_model_context(tokenizer, max_tokens):
    long = " ".join(f"word{i} of a very long retrieved passage about everything." for i in range(400))
    hits = [hit(long, n, score=1 - n / 100) for n in range(1, 21)]
    request = chat("Tell me everything. " * 20, max_tokens=max_tokens)
    augmented, extra = augment(request, hits, tokenizer, MAX_MODEL_LEN)
    total = len(prompt_token_ids(tokenizer, augmented))
    assert total + max_tokens <= MAX_MODEL_LEN
    if extra["citations"]:
        assert [c["n"] for c in extra["citations"]] == list(range(1, len(extra["citations"]) + 1))
        assert extra["citations"][-1]["truncated"] or len(extra["citations"]) < len(hits)
        assert f"[{len(extra['citations'])}]" in augmented["messages"][0]["content"]
        assert f"[{len(extra['citations']) + 1}]" not in augmented["messages"][0]["content"]


def test_no_room_at_all_answers_without_context(tokenizer):
    request = chat(max_tokens=MAX_MODEL_LEN - 40)
    augmented, extra = augment(request, [hit("x " * 500)], tokenizer, MAX_MODEL_LEN)
    assert extra["citations"] == [] and extra["retrieval"]["used"] == 0 and "note" in extra["retrieval"]
    assert augmented["messages"] == request["messages"]


def test_found_nothing_succeeds_with_empty_citations(tokenizer):
    request = chat()
    augmented, extra = augment(request, [], tokenizer, MAX_MODEL_LEN)
    assert augmented == {k: v for k, v in request.items() if k != "rag"}
    assert extra == {"citations": [], "retrieval": {"found": 0, "used": 0, "note": NOTHING_FOUND}}


class _Pool:
    """Stands in for the Postgres pool: search_many is stubbed, so the connection is never used."""

    def connection(self):
        import contextlib

        return contextlib.nullcontext(None)


def rag_job(tenant, content="What colour is the Zorblax?", **rag) -> dict:
    return {"id": uuid.uuid4(), "attempt": 1, "tenant_id": tenant,
            "request": chat(content, max_tokens=8) | {"rag": RAG | rag}}


def test_the_phase_searches_each_collection_set_once_and_classifies_failures(tokenizer, monkeypatch):
    calls = []
    tenant = uuid.uuid4()
    missing, mismatched, empty = (str(uuid.uuid4()) for _ in range(3))

    def fake_search_many(conn, embedder, tenant_id, collection_ids, queries, k, mode, filter, **_):
        calls.append((tuple(collection_ids), tuple(queries), k, mode))
        if collection_ids == [missing]:
            raise NotFound("no collection")
        if collection_ids == [mismatched]:
            raise ModelMismatch("other model")
        if collection_ids == [empty]:
            return [[] for _ in queries]
        return [[hit(f"The answer to {q}")] for q in queries]

    monkeypatch.setattr(retrieval_phase, "search_many", fake_search_many)
    jobs = [rag_job(tenant, "q1"), rag_job(tenant, "q2"), rag_job(tenant, "q3", collections=[missing]),
            rag_job(tenant, "q4", collections=[mismatched]), rag_job(tenant, "q5", collections=[empty])]
    ready, failed = RetrievalPhase(_Pool(), object(), tokenizer, max_model_len=MAX_MODEL_LEN).run(jobs)
    assert sorted(c[1] for c in calls) == [("q1", "q2"), ("q3",), ("q4",), ("q5",)]  # one search per set
    assert {str(j["id"]) for j, _ in failed} == {str(jobs[2]["id"]), str(jobs[3]["id"])}
    assert all(e.kind is ErrorKind.INVALID_REQUEST and not e.retryable for _, e in failed)
    by_id = {str(j["id"]): j for j in ready}
    assert by_id[str(jobs[0]["id"])]["rag_result"]["citations"][0]["snippet"] == "The answer to q1"
    assert by_id[str(jobs[4]["id"])]["rag_result"]["citations"] == []


def test_a_transient_postgres_failure_is_retryable(tokenizer, monkeypatch):
    import psycopg

    def down(*_a, **_k):
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(retrieval_phase, "search_many", down)
    _, failed = RetrievalPhase(_Pool(), object(), tokenizer, max_model_len=MAX_MODEL_LEN).run(
        [rag_job(uuid.uuid4())])
    assert failed[0][1].kind is ErrorKind.RETRIEVAL_UNAVAILABLE and failed[0][1].retryable


def test_the_batch_core_puts_citations_in_the_result(tokenizer):
    engine = SimulatedEngine(token_seconds=0.001, max_num_seqs=8, tokenizer=tokenizer)
    engine.start()
    try:
        job = rag_job(uuid.uuid4())
        request, extra = augment(job["request"], [hit("The Zorblax is bright teal.")], tokenizer, MAX_MODEL_LEN)
        outcomes = []
        BatchCore(engine, tokenizer, job_timeout=30).run([{**job, "request": request, "rag_result": extra},
                                                          rag_job(uuid.uuid4()) | {"request": {"prompt": "hi",
                                                                                              "max_tokens": 4}}],
                                                         outcomes.append)
    finally:
        engine.shutdown()
    results = sorted((o.result for o in outcomes), key=lambda r: "citations" in r)
    assert "citations" not in results[0]
    assert results[1]["citations"][0]["n"] == 1 and results[1]["retrieval"]["used"] == 1
