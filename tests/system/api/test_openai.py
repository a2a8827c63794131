"""The official `openai` client, unmodified, against the API under gunicorn with a router and a GPU
worker process (the SimulatedEngine: this is about the API surface, not the model's text): chat and
text completions come back as jobs, and bad requests raise the client's own error types."""

from __future__ import annotations

import openai
import pytest
import requests

from tasks.jobs import tenants


@pytest.fixture
def client(make_cluster):
    cluster = make_cluster()
    cluster.start_api()
    cluster.start_router()
    cluster.start_worker("sim-0", simulated=True)
    cluster.wait_api()
    cluster.wait_nodes(["sim-0"])
    _, key = tenants.create_tenant(cluster.db, "openai")
    cluster.key = key
    return cluster, openai.OpenAI(base_url=f"{cluster.api}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_openai_client_runs_chat_and_text_completions_as_jobs(client):
    cluster, oa = client
    [model] = [m.id for m in oa.models.list().data]
    assert model == cluster.settings.model_name

    raw = oa.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
        max_tokens=8, temperature=0)
    chat = raw.parse()
    job_id = raw.headers["X-Switchyard-Job-Id"]
    assert chat.object == "chat.completion" and chat.id == f"chatcmpl-{job_id}" and chat.model == model
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length") and 0 < chat.usage.completion_tokens <= 8
    job = requests.get(f"{cluster.api}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {cluster.key}"}).json()
    assert job["status"] == "succeeded" and job["result"]["text"] == chat.choices[0].message.content
    assert job["request"]["messages"][0] == {"role": "system", "content": "Be brief."}

    text = oa.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text and text.usage.completion_tokens <= 5


def test_bad_requests_raise_the_clients_error_types(client):
    cluster, oa = client
    model = cluster.settings.model_name
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 5000}])
    assert "context" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as unsupported:
        oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert unsupported.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cluster.api}/v1", api_key="sy_wrong", max_retries=0).models.list()
    with cluster.db.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone()["n"] == 0  # refused: nothing stored
