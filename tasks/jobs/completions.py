"""A finished job in OpenAI's shapes: the `chat.completion` and `text_completion` objects that the
OpenAI-compatible endpoints answer with and that a batch's output file holds, one per line."""

from __future__ import annotations


def usage(result: dict) -> dict:
    counted = result.get("usage") or {}
    prompt, completion = counted.get("prompt_tokens", 0), counted.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(row: dict) -> dict:
    """A succeeded job (a row with id, created_at, model, result) as a `chat.completion`."""
    result = row["result"]
    return {"id": f"chatcmpl-{row['id']}", "object": "chat.completion", "created": int(row["created_at"].timestamp()),
            "model": row["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "finish_reason": result.get("finish_reason"), "logprobs": None}],
            "usage": usage(result)}


def text_completion(row: dict) -> dict:
    """A succeeded job as a `text_completion`."""
    result = row["result"]
    return {"id": f"cmpl-{row['id']}", "object": "text_completion", "created": int(row["created_at"].timestamp()),
            "model": row["model"],
            "choices": [{"index": 0, "text": result["text"], "finish_reason": result.get("finish_reason"),
                         "logprobs": None}],
            "usage": usage(result)}


#: the builder for each endpoint's answer
BY_ENDPOINT = {"/v1/chat/completions": chat_completion, "/v1/completions": text_completion}
