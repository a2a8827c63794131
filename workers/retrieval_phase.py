"""The retrieval phase of RAG jobs: on the GPU worker, right before generation.

`RetrievalPhase.run(jobs)` takes a started batch, searches for its RAG jobs together (one
`retrieval.search.search_many` call per collection set and search options, so their queries are
embedded in one call), and returns each job with its prompt augmented by the numbered passages
([1]..[n]) and the `citations`/`retrieval` fields its result will carry. Jobs without `rag` pass
through untouched. The passages fit the generation model's context: max_model_len − the request's
max_tokens − the prompt's own tokens (counted with the generation tokenizer), so the prompt never
overflows. A search that finds nothing is not a failure: the job is answered without context and
says so. `augment` is pure (no Postgres), so the prompt assembly is unit-tested with a tokenizer alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from retrieval.context import build_context
from retrieval.errors import ModelMismatch, NotFound
from retrieval.search import DEFAULT_EF_SEARCH, search_many
from tasks import metrics
from tasks.errors import TRANSIENT, ErrorKind, JobError
from tasks.logs import job_fields
from tasks.prompting import prompt_token_ids

log = logging.getLogger(__name__)

INSTRUCTION = ("Answer using the numbered passages below. Cite each passage you use as [n], where n is its "
               "number. If the passages do not contain the answer, say so.")
NOTHING_FOUND = "no passage matched; answered without context"
NO_ROOM = "no room for passages in the model's context; answered without context"
#: tokens kept free besides the budget: joining the context to the prompt may re-tokenize a few more
SAFETY_TOKENS = 8


def is_rag(job: dict) -> bool:
    return bool(job["request"].get("rag"))


def query_of(request: dict) -> str:
    """What to search for: the last user message of a chat, or the plain prompt."""
    if request.get("messages") is not None:
        users = [m["content"] for m in request["messages"] if m["role"] == "user"]
        return users[-1] if users else request["messages"][-1]["content"]
    return request["prompt"]


def _with_context(request: dict, context: str) -> dict:
    """The request with the passages placed in its prompt (a system message, or a preamble)."""
    block = f"{INSTRUCTION}\n\n{context}"
    request = {k: v for k, v in request.items() if k != "rag"}
    if request.get("messages") is not None:
        messages = [dict(m) for m in request["messages"]]
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{block}"
        else:
            messages.insert(0, {"role": "system", "content": block})
        return {**request, "messages": messages}
    return {**request, "prompt": f"{block}\n\n{request['prompt']}"}


def _citation(c) -> dict:
    d = asdict(c)
    d["document_id"] = str(d["document_id"])
    return d


def augment(request: dict, hits: list, tokenizer, max_model_len: int) -> tuple[dict, dict]:
    """(the request to generate, the fields to add to its result: `citations` and `retrieval`)."""
    if not hits:
        return ({k: v for k, v in request.items() if k != "rag"},
                {"citations": [], "retrieval": {"found": 0, "used": 0, "note": NOTHING_FOUND}})
    limit = max_model_len - int(request.get("max_tokens") or 0)
    overhead = len(prompt_token_ids(tokenizer, _with_context(request, "")))
    budget = limit - overhead - SAFETY_TOKENS
    while budget > 0:
        context = build_context(hits, tokenizer, budget)
        if not context.citations:
            break
        augmented = _with_context(request, context.text)
        total = len(prompt_token_ids(tokenizer, augmented))
        if total <= limit:
            return augmented, {"citations": [_citation(c) for c in context.citations],
                               "retrieval": {"found": len(hits), "used": len(context.citations),
                                             "context_tokens": context.tokens}}
        budget -= max(SAFETY_TOKENS, total - limit)  # never overflow: shrink and build again
    return ({k: v for k, v in request.items() if k != "rag"},
            {"citations": [], "retrieval": {"found": len(hits), "used": 0, "note": NO_ROOM}})


def _group_key(rag: dict) -> str:
    return json.dumps([rag["collections"], rag["top_k"], rag["mode"], rag.get("filter")], sort_keys=True)


class RetrievalPhase:
    """Searches for a batch's RAG jobs with one embedder (loaded once, at worker boot) and one pool."""

    def __init__(self, pool, embedder, tokenizer, *, max_model_len: int, ef_search: int = DEFAULT_EF_SEARCH,
                 max_scan_tuples: int = 20_000):
        self.pool, self.embedder, self.tokenizer = pool, embedder, tokenizer
        self.max_model_len, self.ef_search, self.max_scan_tuples = max_model_len, ef_search, max_scan_tuples

    def search(self, jobs: list[dict]) -> dict[str, list]:
        """{job id: hits} for RAG jobs; raises what search_many raises (per group, see run)."""
        groups: dict[str, list[dict]] = {}
        for job in jobs:
            groups.setdefault(_group_key(job["request"]["rag"]), []).append(job)
        hits: dict[str, list | Exception] = {}
        for group in groups.values():
            rag = group[0]["request"]["rag"]
            try:
                with self.pool.connection() as conn, metrics.timed_retrieval(rag["mode"], "job"):
                    found = search_many(conn, self.embedder, group[0]["tenant_id"], rag["collections"],
                                        [query_of(j["request"]) for j in group], rag["top_k"], rag["mode"],
                                        rag.get("filter"), ef_search=self.ef_search,
                                        max_scan_tuples=self.max_scan_tuples)
            except Exception as exc:  # noqa: BLE001 - classified per job in run()
                found = [exc] * len(group)
            hits |= {str(j["id"]): h for j, h in zip(group, found)}
        return hits

    def run(self, jobs: list[dict]) -> tuple[list[dict], list[tuple[dict, JobError]]]:
        """(RAG jobs ready to generate, with `rag_result`; (job, error) for those whose search failed).
        Jobs are grouped per tenant too, since a search is scoped to one tenant."""
        by_tenant: dict[str, list[dict]] = {}
        for job in jobs:
            by_tenant.setdefault(str(job["tenant_id"]), []).append(job)
        hits: dict[str, list | Exception] = {}
        for group in by_tenant.values():
            hits |= self.search(group)
        ready, failed = [], []
        for job in jobs:
            found = hits[str(job["id"])]
            if isinstance(found, Exception):
                failed.append((job, _error_of(job, found)))
                continue
            try:
                request, extra = augment(job["request"], found, self.tokenizer, self.max_model_len)
            except Exception as exc:  # noqa: BLE001 - a prompt the template rejects is the job's fault
                failed.append((job, JobError(ErrorKind.INVALID_REQUEST, f"cannot render the prompt: {exc}")))
                continue
            ready.append({**job, "request": request, "rag_result": extra})
        return ready, failed


def _error_of(job: dict, exc: Exception) -> JobError:
    if isinstance(exc, (NotFound, ModelMismatch)):
        return JobError(ErrorKind.INVALID_REQUEST, f"retrieval refused the job: {exc}")
    if isinstance(exc, TRANSIENT):
        log.warning("job %s: retrieval met Postgres unreachable: %r", job["id"], exc,
                    extra=job_fields(job["id"], job.get("attempt"), tenant=job.get("tenant_id")))
        return JobError(ErrorKind.RETRIEVAL_UNAVAILABLE, f"retrieval failed, Postgres unreachable: {exc}")
    log.error("job %s: retrieval failed: %r", job["id"], exc, extra=job_fields(job["id"], job.get("attempt"),
                                                                                  tenant=job.get("tenant_id")))
    return JobError(ErrorKind.RETRIEVAL_UNAVAILABLE, f"retrieval failed: {exc!r}")
