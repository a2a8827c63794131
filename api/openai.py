"""OpenAI-compatible endpoints over jobs: `POST /v1/chat/completions`, `POST /v1/completions` and
`GET /v1/models`, so code written against the official `openai` client runs on Switchyard unmodified.

Each completion is a job like any other (submitted through api.jobs.submit_job: the same validation,
routing, retries, failover, dead letters and job record), and the request waits for it to finish, as
a parked greenlet (no thread). The job id comes back in `X-Switchyard-Job-Id` (and `Location`), so the
job can still be read, or its webhook awaited, the Switchyard way. Errors are OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the status codes the client maps to its error
types (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...).

`stream: true` streams the text as the engine produces it, in OpenAI's chunk format (server-sent
events, then `[DONE]`; `stream_options.include_usage` adds the usage chunk), read from the job's event
stream (api/events.py). Not supported: `n` > 1 (400), and sampling options the engine path does not
carry (logprobs, penalties, tools, response_format: 400 naming the parameter).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context, url_for
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from api.auth import authenticate
from api.errors import ApiError, validation_errors
from api.events import KEEPALIVE, SSE_HEADERS, STREAM_SECONDS, follow, sse
from api.jobs import load_job, submit_job, wait_slot, wait_until_finished
from tasks.errors import TRANSIENT, QueueUnavailable
from tasks.jobs.completions import chat_completion, text_completion
from tasks.jobs.status import JobStatus
from tasks.routing import registry

bp = Blueprint("openai", __name__, url_prefix="/v1")
bp.before_request(authenticate)

#: how long a completion request waits for its job: under the openai client's own default timeout
#: (600 s), so the client hears the 504 (with the job id) instead of timing out and submitting again
COMPLETION_WAIT = 590.0

_CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                "n", "stream", "stream_options", "user", "metadata"}
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
                      "stream_options", "user"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    response = jsonify(_error_body(status, message, param, code))
    response.status_code = status
    response.headers.update(headers or {})
    return response


@bp.errorhandler(OpenAIError)
def _openai_error(exc: OpenAIError):
    return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError):
    field = (exc.extra.get("errors") or [{}])[0].get("field")
    if exc.title == "Unknown model":
        return _error(404, exc.detail, "model", "model_not_found")
    return _error(400 if exc.status == 422 else exc.status, exc.detail, field, None, exc.headers)


@bp.errorhandler(QueueUnavailable)
def _queue_unavailable(exc: QueueUnavailable):
    return _error(503, "the job queue is unreachable; nothing was stored, retry shortly", headers={"Retry-After": "5"})


@bp.errorhandler(HTTPException)
def _http(exc: HTTPException):
    return _error(exc.code or 500, exc.description or exc.name)


def _unavailable(exc: Exception):
    return _error(503, "a backing service is unreachable; retry shortly", headers={"Retry-After": "5"})


for _kind in TRANSIENT:
    bp.register_error_handler(_kind, _unavailable)


@bp.errorhandler(ValidationError)
def _invalid(exc: ValidationError):
    errors = validation_errors(exc)
    return _error(400, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors[0]["field"] if errors else None)


def _services():
    return current_app.extensions["switchyard"]


def _body(allowed: set[str]) -> dict:
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise OpenAIError(400, "the request body is nested too deeply") from None
    return check_body(body, allowed)


def check_body(body, allowed: set[str]) -> dict:
    """The checks every OpenAI request body passes here (an OpenAIError naming the parameter to fix)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name not in allowed and value is not None:
            raise OpenAIError(400, f"`{name}` is not supported by this server; remove it", name, "unsupported_parameter")
    if not isinstance(body.get("stream", False), bool):
        raise OpenAIError(400, "`stream` must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise OpenAIError(400, "`stream_options` may only hold `include_usage` (true or false)", "stream_options")
    if body.get("n") not in (None, 1):
        raise OpenAIError(400, "only n = 1 is supported", "n", "unsupported_parameter")
    if not body.get("model"):
        raise OpenAIError(400, "`model` is required; GET /v1/models lists the models served", "model")
    if not isinstance(body.get("metadata") or {}, dict):
        raise OpenAIError(400, "`metadata` must be an object of strings", "metadata")
    return body


def _job_body(body: dict, **inputs) -> dict:
    """The JobRequest body for an OpenAI request's common fields."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    job = {"model": body["model"], **inputs, "max_tokens": max_tokens, "temperature": body.get("temperature"),
           "top_p": body.get("top_p"), "stop": body.get("stop"), "seed": body.get("seed"),
           "metadata": {k: v for k, v in (body.get("metadata") or {}).items()}}
    if body.get("user"):
        job["metadata"]["user"] = body["user"]
    return {k: v for k, v in job.items() if v is not None}


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise OpenAIError(400, "only text content parts are supported", f"messages[{i}].content")
            texts.append(part.get("text", ""))
        return "".join(texts)
    return content


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OpenAIError(400, "each message must be an object with `role` and `content`", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"role {m.get('role')!r} is not supported (system, developer, user, assistant)",
                              f"messages[{i}].role")
        out.append({"role": role, "content": _content(m, i)})
    return out


def chat_job(body: dict) -> dict:
    """A checked /v1/chat/completions body as the job it runs (a JobRequest body)."""
    return _job_body(body, messages=_messages(body))


def completion_job(body: dict) -> dict:
    """A checked /v1/completions body as the job it runs (a JobRequest body)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError(400, "`prompt` must be a string (one prompt per request)", "prompt")
    job = _job_body(body, prompt=prompt)
    job.setdefault("max_tokens", 16)  # OpenAI's default for completions
    return job


def endpoint_job(endpoint: str, body) -> dict:
    """A request body for `endpoint` as the job it runs, checked as that endpoint checks it (POST
    /v1/batches checks each line of a batch with it)."""
    if endpoint == "/v1/chat/completions":
        return chat_job(check_body(body, _CHAT_FIELDS))
    return completion_job(check_body(body, _COMPLETION_FIELDS))


def _run(job_body: dict) -> dict:
    """Submit the job and wait for it; the finished row, or an OpenAIError saying why not. The wait
    slot is taken first (a 429 stores nothing); an error after the job exists tells the client not to
    retry (`x-should-retry: false`, which the openai client obeys): a retry would run the job again."""
    with wait_slot(COMPLETION_WAIT):
        row, _ = submit_job(job_body)
        g.job_id = str(row["id"])
        row = wait_until_finished(row, COMPLETION_WAIT)
    status = JobStatus(row["status"])
    if status is JobStatus.SUCCEEDED:
        return row
    raise _failure(row, COMPLETION_WAIT)


def _failure(row: dict, waited: float) -> OpenAIError:
    """Why a job did not succeed, as the OpenAI error a client gets (told not to retry: the job exists)."""
    job_id, status = str(row["id"]), JobStatus(row["status"])
    headers = {"X-Switchyard-Job-Id": job_id, "Location": url_for("jobs.get", job_id=row["id"]),
               "x-should-retry": "false"}
    if not status.is_terminal:
        return OpenAIError(504, f"job {job_id} has not finished after {waited:.0f} s; it goes on: "
                           f"GET /v1/jobs/{job_id}", code="timeout", headers=headers)
    error = row["error"] or {}
    if error.get("type") == "invalid_request":
        return OpenAIError(400, error.get("message", "invalid request"), headers=headers)
    if status is JobStatus.CANCELLED:
        return OpenAIError(409, f"job {job_id} was cancelled: {error.get('message')}", code="cancelled",
                           headers=headers)
    return OpenAIError(500, f"job {job_id} {status.value}: {error.get('message')}", code=error.get("type"),
                       headers=headers)


def _stream(job_body: dict, body: dict, chunk):
    """`stream: true`: the job's text as OpenAI chunks (server-sent events) while the engine produces
    it, then `[DONE]`; a job that fails sends an `error` event instead. `chunk(row, text=, finish=)`
    builds one chunk of the endpoint's kind. A job retried after its node died streams its new attempt
    from the beginning; the first chunk of that attempt says so (`switchyard: {attempt, restarted}`),
    so a client can drop what the failed attempt had sent."""
    slot = ExitStack()
    slot.enter_context(wait_slot(STREAM_SECONDS))  # before anything is stored: a 429 leaves nothing behind
    try:
        row, _ = submit_job({**job_body, "stream": True})
    except BaseException:
        slot.close()
        raise
    job_id, include_usage = row["id"], bool((body.get("stream_options") or {}).get("include_usage"))

    def events():
        attempt, sent = None, False
        yield sse(chunk(row, text="", role=True))
        for _, event in follow(job_id, lambda: load_job(job_id)):
            if event is None:
                yield KEEPALIVE
            elif event["type"] == "delta" or event["status"] == JobStatus.RUNNING.value:
                if attempt is not None and event["attempt"] != attempt:
                    if event["attempt"] < attempt:
                        continue  # late text of an attempt that was given up
                    yield sse(chunk(row, text="", switchyard={"attempt": event["attempt"], "restarted": True}))
                attempt = event["attempt"]
                if event["type"] == "delta":
                    sent = True
                    yield sse(chunk(row, text=event["text"]))
            elif JobStatus(event["status"]).is_terminal:
                final = load_job(job_id)
                if final["status"] != JobStatus.SUCCEEDED.value:
                    failure = _failure(final, STREAM_SECONDS)
                    yield sse(_error_body(failure.status, failure.message, failure.param, failure.code))
                    return
                result = final["result"]
                if not sent and result.get("text"):  # its text never streamed (e.g. the events expired)
                    yield sse(chunk(row, text=result["text"]))
                yield sse(chunk(row, text=None, finish=result.get("finish_reason")))
                if include_usage:
                    yield sse({**chunk(row, text=None), "choices": [], "usage": _usage(result)})
                yield sse("[DONE]")
                return
        failure = _failure(load_job(job_id), STREAM_SECONDS)
        yield sse(_error_body(failure.status, failure.message, failure.param, failure.code))

    response = Response(stream_with_context(events()), headers=SSE_HEADERS)
    response.headers.update(g.get("rate_headers") or {})
    response.headers["X-Switchyard-Job-Id"] = str(job_id)
    response.headers["Location"] = url_for("jobs.get", job_id=job_id)
    response.call_on_close(slot.close)
    return response


def _chat_chunk(row: dict, *, text: str | None, finish: str | None = None, role: bool = False, **extra) -> dict:
    delta = {"role": "assistant", "content": text} if role else ({"content": text} if text is not None else {})
    return {"id": f"chatcmpl-{row['id']}", "object": "chat.completion.chunk", "created": int(row["created_at"].timestamp()),
            "model": row["model"], "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra}


def _completion_chunk(row: dict, *, text: str | None, finish: str | None = None, role: bool = False,
                      **extra) -> dict:
    return {"id": f"cmpl-{row['id']}", "object": "text_completion", "created": int(row["created_at"].timestamp()),
            "model": row["model"], "choices": [{"index": 0, "text": text or "", "finish_reason": finish,
                                                "logprobs": None}], **extra}


def _answer(payload: dict, row: dict):
    response = jsonify(payload)
    response.headers.update(g.get("rate_headers") or {})
    response.headers["X-Switchyard-Job-Id"] = str(row["id"])
    response.headers["Location"] = url_for("jobs.get", job_id=row["id"])
    return response


def _usage(result: dict) -> dict:
    usage = result.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@bp.post("/chat/completions")
def chat_completions():
    body = _body(_CHAT_FIELDS)
    job = chat_job(body)
    if body.get("stream"):
        return _stream(job, body, _chat_chunk)
    row = _run(job)
    return _answer(chat_completion(row), row)


@bp.post("/completions")
def completions():
    body = _body(_COMPLETION_FIELDS)
    job = completion_job(body)
    if body.get("stream"):
        return _stream(job, body, _completion_chunk)
    row = _run(job)
    return _answer(text_completion(row), row)


@bp.get("/models")
def models():
    settings = _services().settings
    names = sorted(registry.known_models(_services().redis) | {settings.model_name})
    now = int(time.time())
    return jsonify({"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "switchyard"}
                                               for n in names]})
