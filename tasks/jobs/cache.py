"""The exact-match result cache: a deterministic job (temperature 0) that opted in with `cache: true`
is answered from an earlier job of the same tenant with the same model and the same generation inputs,
without going near a GPU worker.

An entry is written when such a job succeeds (lifecycle.finish) and read when one is submitted
(lifecycle.submit): a hit is stored as a job of its own, already `succeeded`, its result the earlier
job's with `cached: {"job_id": <that job>}`. Entries live in Redis for settings.result_cache_ttl and are
keyed by tenant, so one tenant never sees another's answers. Only temperature-0 requests without `rag`
may opt in (the API refuses the rest): sampled output is not meant to repeat, and retrieved context
changes as collections change.
"""

from __future__ import annotations

import hashlib
import json

#: the request fields that decide what the engine generates (the model is keyed too)
KEY_FIELDS = ("messages", "prompt", "max_tokens", "temperature", "top_p", "stop")
CACHE_KEY = "switchyard:cache:{}:{}"


def cache_key(tenant_id, model: str, request: dict) -> str:
    inputs = {"model": model, **{f: request.get(f) for f in KEY_FIELDS}}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return CACHE_KEY.format(tenant_id, digest)


def wanted(request: dict) -> bool:
    return bool(request.get("cache"))


def lookup(redis, tenant_id, model: str, request: dict) -> dict | None:
    """The result to answer with (marked `cached`), or None on a miss."""
    raw = redis.get(cache_key(tenant_id, model, request))
    if raw is None:
        return None
    entry = json.loads(raw)
    return {**entry["result"], "cached": {"job_id": entry["job_id"]}}


def remember(redis, job: dict, result: dict, ttl: int) -> None:
    """Keep a succeeded job's result (the job: id, tenant_id, model, request)."""
    if "cached" in result:  # a hit is not a new answer
        return
    entry = {"job_id": str(job["id"]), "result": result}
    redis.set(cache_key(job["tenant_id"], job["model"], job["request"]), json.dumps(entry), ex=ttl)
