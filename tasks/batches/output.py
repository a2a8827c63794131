"""A batch's output and error files, built from its jobs when it ends: one JSONL line per request,
each with the request's `custom_id`, as OpenAI's Batch API writes them.

- output file: each succeeded line, `{"id": "batch_req_…", "custom_id", "response": {"status_code": 200,
  "request_id", "body": <chat.completion | text_completion>}, "error": null}`;
- error file: each line that did not succeed. A request that ran and failed has a `response` with the
  status code and OpenAI error body the endpoint would have answered; one that never ran because the
  batch expired or was cancelled has `"response": null` and an `error` with code `batch_expired` or
  `batch_cancelled`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tasks.batches.resource import request_id
from tasks.jobs.completions import BY_ENDPOINT
from tasks.jobs.status import JobStatus

_UNRUN = {"expired": ("batch_expired", "This request could not be executed before the completion window expired."),
          "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled.")}


@dataclass(frozen=True)
class Output:
    output: bytes
    errors: bytes
    completed: int
    failed: int
    usage: dict


def _dump(item: dict) -> str:
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False)


def _failure(job: dict, batch_status: str) -> dict:
    """A line that did not succeed: the endpoint's error answer, or why it never ran."""
    error = job["error"] or {}
    if job["status"] == JobStatus.CANCELLED.value:
        code, message = _UNRUN.get(batch_status, ("cancelled", error.get("message") or "the request was cancelled"))
        return {"response": None, "error": {"code": code, "message": message}}
    invalid = error.get("type") == "invalid_request"
    status = 400 if invalid else 500
    body = {"error": {"message": f"job {job['id']} {job['status']}: {error.get('message')}",
                      "type": "invalid_request_error" if invalid else "server_error", "param": None,
                      "code": error.get("type")}}
    return {"response": {"status_code": status, "request_id": str(job["id"]), "body": body}, "error": None}


def build(endpoint: str, batch_status: str, jobs: list[dict]) -> Output:
    """The files of a batch that ends as `batch_status`, from its jobs (every one finished: id,
    custom_id, status, model, created_at, result, error), in line order."""
    answer = BY_ENDPOINT[endpoint]
    out, err = [], []
    tokens_in = tokens_out = 0
    for job in jobs:
        line = {"id": request_id(job["id"]), "custom_id": job["custom_id"]}
        if job["status"] == JobStatus.SUCCEEDED.value:
            body = answer(job)
            tokens_in += body["usage"]["prompt_tokens"]
            tokens_out += body["usage"]["completion_tokens"]
            out.append(_dump({**line, "response": {"status_code": 200, "request_id": str(job["id"]), "body": body},
                              "error": None}))
        else:
            err.append(_dump({**line, **_failure(job, batch_status)}))
    usage = {"input_tokens": tokens_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": tokens_out,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": tokens_in + tokens_out}
    return Output(output="".join(f"{line}\n" for line in out).encode(),
                  errors="".join(f"{line}\n" for line in err).encode(),
                  completed=len(out), failed=len(err), usage=usage)
