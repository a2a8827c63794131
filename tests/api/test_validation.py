"""Every bad input gets a 4xx problem+json that names what to fix, and leaves no row and no message."""

from __future__ import annotations

import json

import pytest

from tasks.jobs import tenants
from tasks.routing import registry
from tests.api.support import queued_messages
from tests.support import auth, job_count

LONG_PROMPT = "word " * 5000  # ~5000 tokens, past the 2048-token context

BAD_REQUESTS = [
    # (case id, body (dict, or raw bytes), expected status, words the detail must contain)
    ("malformed-json", b'{"prompt": "hi"', 400, "not valid JSON"),
    ("not-an-object", b'["hi"]', 400, "JSON object"),
    ("unknown-field", {"prompt": "hi", "temprature": 0.5}, 422, "temprature"),
    ("wrong-type-prompt", {"prompt": 123}, 422, "prompt"),
    ("wrong-type-max-tokens", {"prompt": "hi", "max_tokens": "many"}, 422, "max_tokens"),
    ("wrong-type-messages", {"messages": "hello"}, 422, "messages"),
    ("empty-prompt", {"prompt": ""}, 422, "prompt must not be empty"),
    ("blank-prompt", {"prompt": "   \n"}, 422, "prompt must not be empty"),
    ("empty-messages", {"messages": []}, 422, "messages"),
    ("empty-message-content", {"messages": [{"role": "user", "content": ""}]}, 422, "content must not be empty"),
    ("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ("no-input", {"max_tokens": 5}, 422, "exactly one of"),
    ("both-inputs", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 422, "exactly one of"),
    ("max-tokens-zero", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ("max-tokens-negative", {"prompt": "hi", "max_tokens": -3}, 422, "max_tokens"),
    ("max-tokens-over-limit", {"prompt": "hi", "max_tokens": 100000}, 422, "at most 2048"),
    ("max-tokens-past-context", {"prompt": "word " * 1500, "max_tokens": 2000}, 422, "lower max_tokens"),
    ("prompt-past-context", {"prompt": LONG_PROMPT}, 422, "context is 2048 tokens"),
    ("chat-past-context", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 422, "context is 2048 tokens"),
    ("temperature-out-of-range", {"prompt": "hi", "temperature": 7}, 422, "temperature"),
    ("top-p-zero", {"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ("unknown-model", {"prompt": "hi", "model": "gpt-9"}, 422, "gpt-9"),
    ("unknown-strategy", {"prompt": "hi", "routing": {"strategy": "random"}}, 422, "unknown routing strategy"),
    # No live node at all here, so none advertises seed support (see test_a_seed_follows_...).
    ("seed-unsupported", {"prompt": "hi", "seed": 7, "temperature": 0.8}, 422, "seed"),
    ("bad-metadata", {"prompt": "hi", "metadata": {"k": {"nested": 1}}}, 422, "metadata"),
    ("cache-sampled", {"prompt": "hi", "cache": True, "temperature": 0.7}, 422, "set `temperature` to 0"),
    ("cache-default-temperature", {"prompt": "hi", "cache": True}, 422, "only deterministic requests"),
    ("cache-with-rag", {"prompt": "hi", "cache": True, "temperature": 0,
                        "rag": {"collections": ["00000000-0000-0000-0000-000000000001"]}}, 422, "cannot use the cache"),
]


@pytest.mark.parametrize("body,status,words", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_with_nothing_written(client, api_redis, db, tenant, body, status, words):
    t, key = tenant
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/jobs", data=data, headers={**auth(key), "Content-Type": "application/json"})

    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["status"] == status and problem["title"]
    assert words in problem["detail"], problem["detail"]
    assert job_count(db, t.id) == 0
    assert queued_messages(api_redis) == 0


@pytest.mark.parametrize("supports_seed", [False, True], ids=["engine-without-seeds", "engine-with-seeds"])
def test_a_seed_follows_the_serving_engines_advertised_support(client, api_redis, db, tenant, api_settings,
                                                                supports_seed):
    """A sampled request with a seed is accepted exactly when a live node serving the model advertises
    `supports_seed` in its heartbeat record (vLLM on CPU does not, on a GPU it does), else refused."""
    t, key = tenant
    node = {"id": "seed-node", "models": [api_settings.model_name], "engine_state": "ready",
            "supports_seed": supports_seed}
    registry.heartbeat(api_redis, node, ttl=60)
    response = client.post("/v1/jobs", json={"prompt": "hi", "seed": 7, "temperature": 0.8, "max_tokens": 4},
                           headers=auth(key))
    if supports_seed:
        assert response.status_code == 202, response.get_data(as_text=True)
        assert response.get_json()["request"]["seed"] == 7
        assert job_count(db, t.id) == 1 and queued_messages(api_redis) == 1
    else:
        assert response.status_code == 422 and "seed" in response.get_json()["detail"], response.get_json()
        assert job_count(db, t.id) == 0 and queued_messages(api_redis) == 0


def test_body_over_size_limit_is_413(client, api_redis, db, tenant, api_settings):
    t, key = tenant
    body = json.dumps({"prompt": "x" * (api_settings.max_body_bytes + 10)})
    response = client.post("/v1/jobs", data=body, headers={**auth(key), "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"
    assert str(api_settings.max_body_bytes) in response.get_json()["detail"]
    assert job_count(db, t.id) == 0 and queued_messages(api_redis) == 0


def test_non_json_content_type_is_415(client, api_redis, db, tenant):
    t, key = tenant
    response = client.post("/v1/jobs", data="prompt=hi", headers={**auth(key), "Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in response.get_json()["detail"]
    assert job_count(db, t.id) == 0 and queued_messages(api_redis) == 0


def test_valid_request_writes_one_row_and_one_message(client, api_redis, db, tenant):
    """The control for the tests above: the same checks do see a job when one is made."""
    t, key = tenant
    response = client.post("/v1/jobs", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                             "seed": 3, "temperature": 0, "stop": "\n", "metadata": {"run": 1}},
                           headers=auth(key))
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 1 and job["model"] == "SmolLM2-135M-Instruct"
    assert job["request"]["stop"] == ["\n"] and job["metadata"] == {"run": 1}
    assert job_count(db, t.id) == 1
    assert queued_messages(api_redis) == 1


def test_default_max_tokens_fits_the_context(client, api_redis, tenant, api_settings):
    _, key = tenant
    response = client.post("/v1/jobs", json={"prompt": "word " * 1900}, headers=auth(key))
    assert response.status_code == 202
    assert response.get_json()["request"]["max_tokens"] < api_settings.default_max_tokens


UNSTORABLE = [
    ("deeply-nested-json", b"[" * 100_000, 400, "nested too deeply"),
    ("nul-in-prompt", {"prompt": "a\u0000b"}, 422, "NUL"),
    ("nul-in-metadata", {"prompt": "hi", "metadata": {"k": "a\u0000"}}, 422, "NUL"),
    ("lone-surrogate", b'{"prompt": "\\ud800"}', 422, "surrogates"),
    ("nan-in-metadata", b'{"prompt": "hi", "metadata": {"x": NaN}}', 422, "finite"),
]


@pytest.mark.parametrize("body,status,words", [c[1:] for c in UNSTORABLE], ids=[c[0] for c in UNSTORABLE])
def test_input_postgres_or_the_tokenizer_cannot_take_is_a_4xx(client, api_redis, db, tenant, body, status, words):
    test_bad_request_is_refused_with_nothing_written(client, api_redis, db, tenant, body, status, words)


def test_method_not_allowed_keeps_the_allow_header(client):
    response = client.delete("/v1/jobs")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert response.mimetype == "application/problem+json"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1e9"])
def test_a_bad_cancel_after_is_refused_with_nothing_written(client, api_redis, db, tenant, value):
    t, key = tenant
    response = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4},
                           headers={**auth(key), "Cancel-After": value})
    assert response.status_code == 400 and "Cancel-After" in response.get_json()["detail"]
    assert job_count(db, t.id) == 0 and queued_messages(api_redis) == 0


def test_cancel_after_sets_the_jobs_deadline(client, api_redis, tenant):
    _, key = tenant
    response = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers={**auth(key), "Cancel-After": "90"})
    job = response.get_json()
    assert response.status_code == 202 and job["cancel_at"] > job["created_at"]


def test_a_tenant_over_its_submit_rate_gets_429_with_ratelimit_headers_and_nothing_stored(client, api_redis, db,
                                                                                         tenant):
    t, key = tenant
    tenants.set_limits(db, t.name, {"submit_rate": 0.2, "submit_burst": 3})
    answers = [client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=auth(key)) for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    assert answers[0].headers["RateLimit-Policy"] == '"submits";q=3;w=15'
    assert answers[2].headers["RateLimit"].startswith('"submits";r=0;')
    refused = answers[3]
    assert int(refused.headers["Retry-After"]) >= 1 and "retry in" in refused.get_json()["detail"]
    assert refused.headers["RateLimit"].startswith('"submits";r=0;')
    assert job_count(db, t.id) == 3 and queued_messages(api_redis) == 3


def test_a_tenants_max_attempts_ceiling_is_enforced(client, api_redis, db, tenant):
    t, key = tenant
    tenants.set_limits(db, t.name, {"max_attempts": 2})
    refused = client.post("/v1/jobs", json={"prompt": "hi", "max_attempts": 3}, headers=auth(key))
    assert refused.status_code == 422 and "at most 2 attempts" in refused.get_json()["detail"]
    accepted = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=auth(key))
    assert accepted.status_code == 202 and accepted.get_json()["max_attempts"] == 2
    with pytest.raises(ValueError, match="unknown limit"):
        tenants.set_limits(db, t.name, {"speed": 3})
    assert tenants.set_limits(db, t.name, {"max_attempts": None}) == {}
