"""The per-tenant wait slots in Redis: a short wait never shortens the life of the slots that longer
waits hold, and a submit that would wait with every slot taken is answered at once (202), stored once."""

from __future__ import annotations

import uuid

from api.limits import WAITS_KEY, WaitSlots
from tasks.jobs import tenants
from tests.support import auth, job_count


def test_a_short_wait_does_not_shorten_the_slots_of_long_ones(api_redis):
    slots, tenant = WaitSlots(api_redis, cap=10), uuid.uuid4()
    with slots.hold(tenant, 590):
        with slots.hold(tenant, 1):
            assert api_redis.pttl(WAITS_KEY.format(tenant)) > 590_000
        assert api_redis.zcard(WAITS_KEY.format(tenant)) == 1
    assert api_redis.zcard(WAITS_KEY.format(tenant)) == 0


def test_prefer_wait_with_no_slot_free_answers_202_at_once_and_stores_one_job(client, api_redis, db, tenant):
    t, key = tenant
    tenants.set_limits(db, t.name, {"max_waits": 1})
    api_redis.zadd(WAITS_KEY.format(t.id), {"someone-else": 9_999_999_999})  # the only slot is taken
    response = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers={**auth(key), "Prefer": "wait=30"})
    assert response.status_code == 202 and "Preference-Applied" not in response.headers
    assert job_count(db, t.id) == 1


def test_output_tokens_per_minute_are_a_bucket_of_their_own(client, api_redis, db, tenant):
    t, key = tenant
    tenants.set_limits(db, t.name, {"output_tokens_per_minute": 100})
    first = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 60}, headers=auth(key))
    assert first.status_code == 202
    second = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 60}, headers=auth(key))
    assert second.status_code == 429 and "output tokens" in second.get_json()["detail"]
    assert int(second.headers["Retry-After"]) >= 1 and second.headers["RateLimit"].startswith('"output-tokens";')
    too_big = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 150}, headers=auth(key))
    assert too_big.status_code == 429 and "lower max_tokens" in too_big.get_json()["detail"]
    assert job_count(db, t.id) == 1
    # the refused jobs did not use up the tenant's job bucket
    assert float(api_redis.hget(f"switchyard:submits:{t.id}", "tokens")) > 1990


def test_replays_per_day_are_counted_and_capped(api_redis):
    from api.errors import ApiError
    from api.limits import count_replay

    tenant_id = uuid.uuid4()
    count_replay(api_redis, tenant_id, 2)
    count_replay(api_redis, tenant_id, 2)
    try:
        count_replay(api_redis, tenant_id, 2)
    except ApiError as exc:
        assert exc.status == 429 and "2 dead letters a day" in exc.detail and int(exc.headers["Retry-After"]) > 0
    else:
        raise AssertionError("a third replay was allowed")


def test_active_jobs_and_their_prompt_tokens_are_capped(client, api_redis, db, tenant):
    t, key = tenant
    tenants.set_limits(db, t.name, {"max_active_jobs": 2})
    codes = [client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=auth(key)).status_code
             for _ in range(3)]
    assert codes == [202, 202, 429] and job_count(db, t.id) == 2
    tenants.set_limits(db, t.name, {"max_active_jobs": None, "max_queued_prompt_tokens": 50})
    import time

    time.sleep(1.1)  # the API remembers a key's limits for a second
    big = client.post("/v1/jobs", json={"prompt": "word " * 60, "max_tokens": 4}, headers=auth(key))
    assert big.status_code == 429 and "prompt tokens" in big.get_json()["detail"] and job_count(db, t.id) == 2
