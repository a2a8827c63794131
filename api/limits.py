"""Per-tenant limits the API enforces across all its processes, kept in Redis.

Submissions: a token bucket per tenant (one Lua script: refill by elapsed time on Redis's own clock,
take one token or refuse), so the rate holds however many API processes share the load. Every submit
answer carries the IETF RateLimit / RateLimit-Policy headers; a refused one is 429 with Retry-After, and
nothing is stored.

Concurrent long-polls: each GET /v1/jobs/{id}?wait=N that has to wait holds a slot, a member of the
tenant's sorted set scored by when it expires (the wait plus a margin, so a process that dies holding
slots frees them by itself). Taking a slot is one Lua script (expired members dropped, count checked,
member added), atomic across API processes. Beyond the cap: 429 with Retry-After, and nothing held.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from contextlib import contextmanager

import redis

from api.errors import ApiError

log = logging.getLogger(__name__)

WAITS_KEY = "switchyard:waits:{}"
_MARGIN = 30.0  # seconds a slot outlives its wait, for a process that dies without giving it back

_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then  -- never shorten it: longer waits hold slots too
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 1
"""


_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait = 0
if allowed == 0 then wait = (cost - tokens) / rate end
return {allowed, tostring(tokens), tostring(wait), tostring((burst - tokens) / rate)}
"""
SUBMITS_KEY = "switchyard:submits:{}"
TOKENS_KEY = "switchyard:output-tokens:{}"
REPLAYS_KEY = "switchyard:replays:{}:{}"  # tenant, UTC day


def count_replay(client: redis.Redis, tenant_id, per_day: int) -> None:
    """One dead-letter replay of the tenant's today (UTC); ApiError 429 past `per_day`."""
    day = time.strftime("%Y%m%d", time.gmtime())
    key = REPLAYS_KEY.format(tenant_id, day)
    with client.pipeline() as pipe:
        done, _ = pipe.incr(key).expire(key, 2 * 86400).execute()
    if done > per_day:
        client.decr(key)
        until_midnight = 86400 - int(time.time()) % 86400
        raise ApiError(429, "Too Many Requests", f"this tenant may replay {per_day} dead letters a day (UTC); "
                       "the count starts again at midnight UTC", headers={"Retry-After": str(until_midnight)})


class SubmitRate:
    """Per-tenant token buckets for submissions: jobs (`rate` per second, up to `burst` at once) and
    output tokens (a job's max_tokens, `per_minute`). Both are checked before a job is stored."""

    def __init__(self, client: redis.Redis):
        self._take = client.register_script(_BUCKET)
        self._redis = client

    def take(self, tenant_id, rate: float, burst: int, *, max_tokens: int = 0, tokens_per_minute: int = 0) -> dict:
        """One job's share of both buckets: the RateLimit headers to answer with; ApiError 429 when either
        refuses (the job bucket is given its token back when only the token bucket refused)."""
        headers = self._one(SUBMITS_KEY.format(tenant_id), "submits", rate, burst, 1,
                            f"this tenant may submit {burst} jobs at once and {rate:g} per second after that")
        if tokens_per_minute and max_tokens:
            try:
                self._one(TOKENS_KEY.format(tenant_id), "output-tokens", tokens_per_minute / 60, tokens_per_minute,
                          max_tokens, f"this tenant may ask for {tokens_per_minute} output tokens (max_tokens) per "
                          "minute")
            except ApiError:
                self._refund(SUBMITS_KEY.format(tenant_id), burst)
                raise
        return headers

    def _one(self, key: str, name: str, rate: float, burst: int, cost: int, what: str) -> dict:
        allowed, left, wait, full = self._take(keys=[key], args=[rate, burst, cost])
        left, wait, full = float(left), float(wait), float(full)
        window = max(1, math.ceil(burst / rate))
        headers = {"RateLimit-Policy": f'"{name}";q={burst};w={window}',
                   "RateLimit": f'"{name}";r={int(left)};t={math.ceil(wait if not allowed else full)}'}
        if not allowed:
            retry = max(1, math.ceil(wait))
            if cost > burst:
                raise ApiError(429, "Too Many Requests", f"{what}; this job alone asks for {cost}: lower max_tokens",
                               headers=headers)
            raise ApiError(429, "Too Many Requests", f"{what}; retry in {retry} s (nothing was stored)",
                           headers={**headers, "Retry-After": str(retry)})
        return headers

    def _refund(self, key: str, burst: int) -> None:
        self._redis.eval("local t = tonumber(redis.call('HGET', KEYS[1], 'tokens'))"
                         " if t then redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(t + 1, tonumber(ARGV[1])))) end",
                         1, key, burst)


class WaitSlots:
    def __init__(self, client: redis.Redis, cap: int):
        self._redis, self.cap = client, cap
        self._take = client.register_script(_TAKE)

    @contextmanager
    def hold(self, tenant_id, seconds: float, cap: int | None = None):
        """Hold one of the tenant's long-poll slots for up to `seconds`; 429 if all `cap` (default: the
        deployment's) are taken."""
        cap = cap or self.cap
        key, member, now = WAITS_KEY.format(tenant_id), uuid.uuid4().hex, time.time()
        expires = now + seconds + _MARGIN
        if not self._take(keys=[key], args=[now, expires, cap, member, int((seconds + _MARGIN) * 1000)]):
            raise ApiError(429, "Too Many Requests",
                           f"this tenant already has {cap} long-polls waiting; retry shortly, or poll "
                           "without `wait`", headers={"Retry-After": "1"})
        try:
            yield
        finally:
            try:
                self._redis.zrem(key, member)
            except redis.RedisError:  # the slot expires by itself
                log.warning("could not give back a long-poll slot of tenant %s", tenant_id)
