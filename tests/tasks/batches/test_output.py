"""A batch's output and error files from its finished jobs: one line per request, each with its
custom_id, in OpenAI's shapes."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from tasks.batches.output import build


def _job(custom_id: str, status: str, result=None, error=None) -> dict:
    return {"id": uuid.uuid4(), "custom_id": custom_id, "status": status, "model": "m",
            "created_at": datetime(2025, 1, 1, tzinfo=timezone.utc), "result": result, "error": error}


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_succeeded_lines_go_to_the_output_the_rest_to_the_error_file():
    ok = _job("a", "succeeded", {"text": "hello", "finish_reason": "stop",
                                 "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    failed = _job("b", "failed", error={"type": "invalid_request", "message": "template refused"})
    dead = _job("c", "dead", error={"type": "worker_lost", "message": "node died (gave up after 3 attempts)"})
    unrun = _job("d", "cancelled", error={"type": "cancelled", "message": "its batch was cancelled"})
    files = build("/v1/chat/completions", "cancelled", [ok, failed, dead, unrun])
    [out] = _lines(files.output)
    assert out["id"] == f"batch_req_{ok['id'].hex}" and out["custom_id"] == "a" and out["error"] is None
    assert out["response"]["status_code"] == 200 and out["response"]["request_id"] == str(ok["id"])
    body = out["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "hello"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    errors = {e["custom_id"]: e for e in _lines(files.errors)}
    assert list(errors) == ["b", "c", "d"]
    assert errors["b"]["response"]["status_code"] == 400 and errors["b"]["error"] is None
    assert errors["b"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors["c"]["response"]["status_code"] == 500 and "gave up" in errors["c"]["response"]["body"]["error"]["message"]
    assert errors["d"]["response"] is None and errors["d"]["error"]["code"] == "batch_cancelled"
    assert (files.completed, files.failed) == (1, 3)
    assert files.usage["input_tokens"] == 5 and files.usage["output_tokens"] == 2 and files.usage["total_tokens"] == 7


def test_lines_an_expired_batch_never_ran_say_so_and_completions_are_text_completions():
    done = _job("a", "succeeded", {"text": "x", "finish_reason": "length", "usage": {}})
    files = build("/v1/completions", "expired", [done, _job("b", "cancelled", error={"type": "cancelled",
                                                                                    "message": "window"})])
    assert _lines(files.output)[0]["response"]["body"]["object"] == "text_completion"
    assert _lines(files.errors)[0]["error"]["code"] == "batch_expired"
    # an empty file is empty (no output file is written for it)
    assert build("/v1/completions", "completed", []).output == b""
