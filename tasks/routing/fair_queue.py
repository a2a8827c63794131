"""The fair queue: where routed-to-be jobs wait until a node has room, served fairly between tenants.

A job's route message is consumed at once (tasks.routing.task) and the job lands here; the dispatcher
(tasks.routing.dispatcher) takes jobs out only as nodes have free slots. So the backlog waits here,
not in first-in-first-out Celery queues, and the order in which it is served is decided here:

- **Priority classes.** `interactive` jobs are served before `batch` jobs, strictly: batch work only
  fills capacity that no interactive job wants.
- **Weighted fair share within a class**: start-time fair queuing (Goyal, Vin and Cheng, 1996). Each
  tenant with waiting jobs has a tag, the virtual start time of its next job; the tenant with the
  smallest tag is served next and its tag advances by the job's cost / the tenant's weight. A tenant
  that becomes active starts at the current virtual time (the tag of the job last served), not at
  its old tag: idling earns no credit. Two backlogged tenants with weights 2 : 1 get service 2 : 1;
  one job from an idle tenant is next in line however long another tenant's backlog is.

A job's cost is its output-token budget (max_tokens): what it may take from an engine.

Every push and pop is one Lua script, so several routers and dispatchers see one consistent queue.
The scripts build key names from their arguments (one list per tenant and class), which standalone
Redis/Valkey allows; a Redis Cluster deployment would need the keys of one model in one hash slot.

Keys, per model and class (`<base>` = switchyard:fq:<model>:<class>):
- `<base>:active`  sorted set: tenant → its tag, for tenants with jobs waiting
- `<base>:q:<tenant>`  list: the tenant's waiting jobs, oldest first (JSON entries)
- `<base>:clock`  the virtual time; `<base>:finish`  hash: tenant → its last finish tag
and per model `switchyard:fq:<model>:backlog`, a list with one entry per waiting job (of any tenant
or class): the queue depth as a plain Redis list, for KEDA's `redis` trigger and for operators (LLEN);
and for all models: `switchyard:fq:pending` (job id → model; what the reconciler checks before it
re-publishes a queued job) and `switchyard:fq:weights` (tenant → weight).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PREFIX = "switchyard:fq:"
PENDING_KEY = PREFIX + "pending"
WEIGHTS_KEY = PREFIX + "weights"
MODELS_KEY = PREFIX + "models"  # models with jobs waiting
#: pushed to whenever there may be work for the dispatcher: a job arrived, or a node slot was freed
WAKE_KEY = PREFIX + "wake"

NO_TENANT = "-"  # the line of jobs whose route message names no tenant (sent before tenants were)

INTERACTIVE, BATCH = "interactive", "batch"
#: the priority classes, in the order they are served
CLASSES = (INTERACTIVE, BATCH)

# KEYS: pending, weights, models. ARGV: prefix, model, class, tenant, weight, job id, entry.
_PUSH = """
local base = ARGV[1] .. ARGV[2] .. ':' .. ARGV[3]
local tenant = ARGV[4]
redis.call('RPUSH', base .. ':q:' .. tenant, ARGV[7])
redis.call('RPUSH', ARGV[1] .. ARGV[2] .. ':backlog', ARGV[6])
redis.call('HSET', KEYS[1], ARGV[6], ARGV[2])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], tenant, ARGV[5]) end
redis.call('SADD', KEYS[3], ARGV[2])
if not redis.call('ZSCORE', base .. ':active', tenant) then
  local clock = tonumber(redis.call('GET', base .. ':clock') or '0')
  local last = tonumber(redis.call('HGET', base .. ':finish', tenant) or '0')
  redis.call('ZADD', base .. ':active', math.max(clock, last), tenant)
end
return 1
"""

# KEYS: pending, weights, models. ARGV: prefix, model, then per class (in serving order): its name and
# how many of its jobs may be taken at most; no more than ARGV[3] jobs in all.
# Returns the entries taken, in serving order.
_POP = """
local prefix, model, total = ARGV[1], ARGV[2], tonumber(ARGV[3])
local taken, waiting = {}, 0
for c = 4, #ARGV, 2 do
  local base = prefix .. model .. ':' .. ARGV[c]
  local active, allowed = base .. ':active', math.min(tonumber(ARGV[c + 1]), total - #taken)
  local n = 0
  while n < allowed do
    local head = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
    if #head == 0 then break end
    local tenant, tag = head[1], tonumber(head[2])
    local q = base .. ':q:' .. tenant
    local entry = redis.call('LPOP', q)
    if entry then
      local job = cjson.decode(entry)
      local weight = tonumber(redis.call('HGET', KEYS[2], tenant) or '1')
      local finish = tag + job.cost / weight
      redis.call('SET', base .. ':clock', tostring(tag))
      if redis.call('LLEN', q) > 0 then
        redis.call('ZADD', active, finish, tenant)
      else
        redis.call('ZREM', active, tenant)
        redis.call('HSET', base .. ':finish', tenant, tostring(finish))
      end
      redis.call('HDEL', KEYS[1], job.job_id)
      redis.call('LPOP', prefix .. model .. ':backlog')
      taken[#taken + 1] = entry
      n = n + 1
    else
      redis.call('ZREM', active, tenant)
    end
  end
  waiting = waiting + redis.call('ZCARD', active)
end
if waiting == 0 then redis.call('SREM', KEYS[3], model) end
return taken
"""


@dataclass(frozen=True)
class Entry:
    """One waiting job: what the dispatcher needs to route it."""

    job_id: str
    attempt: int
    strategy: str
    affinity_key: str | None
    enqueued_at: float
    tenant: str
    priority: str
    cost: int

    def encode(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> "Entry":
        return cls(**json.loads(raw))


def push(redis, model: str, entry: Entry, weight: float | None = None) -> None:
    """Add a job to its tenant's queue in its class (and set the tenant's weight, if given); the
    dispatcher is woken."""
    push_many(redis, [(model, entry, weight)])


def push_many(redis, jobs: list[tuple[str, Entry, float | None]]) -> None:
    """push() for many (model, entry, weight), in one round trip."""
    for _, entry, _ in jobs:
        if entry.priority not in CLASSES:
            raise ValueError(f"priority must be one of {CLASSES}, got {entry.priority!r}")
    if not jobs:
        return
    script = redis.register_script(_PUSH)
    with redis.pipeline(transaction=False) as pipe:
        for model, entry, weight in jobs:
            script(keys=[PENDING_KEY, WEIGHTS_KEY, MODELS_KEY],
                   args=[PREFIX, model, entry.priority, entry.tenant, "" if weight is None else weight,
                         entry.job_id, entry.encode()], client=pipe)
        _signal(pipe)
        pipe.execute()


def pop(redis, model: str, limits: dict[str, int]) -> list[Entry]:
    """Take up to limits[class] jobs of each class (interactive first, then batch), at most
    max(limits) in all, in fair order."""
    args = [PREFIX, model, max(limits.values(), default=0)]
    for klass in CLASSES:
        args += [klass, limits.get(klass, 0)]
    raw = redis.register_script(_POP)(keys=[PENDING_KEY, WEIGHTS_KEY, MODELS_KEY], args=args)
    return [Entry.decode(r) for r in raw]


def backlog_key(model: str) -> str:
    """The list whose length is the number of jobs of `model` waiting in the fair queue."""
    return f"{PREFIX}{model}:backlog"


def waiting_models(redis) -> set[str]:
    return {m.decode() if isinstance(m, bytes) else m for m in redis.smembers(MODELS_KEY)}


def pending(redis, job_ids: list[str]) -> set[str]:
    """Those of `job_ids` that are waiting in the fair queue."""
    if not job_ids:
        return set()
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hexists(PENDING_KEY, job_id)
        found = pipe.execute()
    return {j for j, hit in zip(job_ids, found) if hit}


def depth(redis, model: str) -> dict[str, dict[str, int]]:
    """{class: {tenant: jobs waiting}} for one model (for operators, metrics and tests)."""
    out: dict[str, dict[str, int]] = {}
    for klass in CLASSES:
        base = f"{PREFIX}{model}:{klass}"
        tenants = [t.decode() if isinstance(t, bytes) else t for t in redis.zrange(f"{base}:active", 0, -1)]
        with redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.llen(f"{base}:q:{tenant}")
            out[klass] = dict(zip(tenants, pipe.execute()))
    return out


def _signal(pipe) -> None:
    pipe.lpush(WAKE_KEY, 1)
    pipe.ltrim(WAKE_KEY, 0, 0)  # one signal is enough, however many wait to be read


def wake(redis) -> None:
    """Tell a waiting dispatcher there may be work (a job arrived, or a slot was freed)."""
    with redis.pipeline(transaction=False) as pipe:
        _signal(pipe)
        pipe.execute()
