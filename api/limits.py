"""Per-tenant limits the API enforces across all its processes, kept in Redis.

Concurrent long-polls: each GET /v1/jobs/{id}?wait=N that has to wait holds a slot, a member of the
tenant's sorted set scored by when it expires (the wait plus a margin, so a process that dies holding
slots frees them by itself). Taking a slot is one Lua script (expired members dropped, count checked,
member added), atomic across API processes. Beyond the cap: 429 with Retry-After, and nothing held.
"""

from __future__ import annotations

import logging
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
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


class WaitSlots:
    def __init__(self, client: redis.Redis, cap: int):
        self._redis, self.cap = client, cap
        self._take = client.register_script(_TAKE)

    @contextmanager
    def hold(self, tenant_id, seconds: float):
        """Hold one of the tenant's long-poll slots for up to `seconds`; 429 if all are taken."""
        key, member, now = WAITS_KEY.format(tenant_id), uuid.uuid4().hex, time.time()
        expires = now + seconds + _MARGIN
        if not self._take(keys=[key], args=[now, expires, self.cap, member, int((seconds + _MARGIN) * 1000)]):
            raise ApiError(429, "Too Many Requests",
                           f"this tenant already has {self.cap} long-polls waiting; retry shortly, or poll "
                           "without `wait`", headers={"Retry-After": "1"})
        try:
            yield
        finally:
            try:
                self._redis.zrem(key, member)
            except redis.RedisError:  # the slot expires by itself
                log.warning("could not give back a long-poll slot of tenant %s", tenant_id)
