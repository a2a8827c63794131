"""A crowd of HTTP clients: thousands of concurrent long-polls from one process (asyncio + aiohttp), for
the waiting tests and the benchmarks.

Each client sends `GET /v1/jobs/{id}?wait=N` and, while its job is not finished, asks again (a wait can
end before the job does). What comes back per job: when the client learned the job's final state (Unix
time, this host's clock), the status, how many requests it took, and any error (a connection error is
counted, never retried silently: "every client hears back" is what these runs check).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

TERMINAL = {"succeeded", "failed", "cancelled", "dead"}


@dataclass
class Outcome:
    job_id: str
    status: str | None = None  # the job's final status as the client saw it
    heard_at: float | None = None  # time.time() when the final answer arrived
    requests: int = 0
    http_errors: int = 0  # 4xx/5xx answers (a 429 is retried after its Retry-After)
    error: str | None = None  # a connection error or timeout, which ends this client


async def _follow(session: aiohttp.ClientSession, api: str, key: str, job_id: str, wait: int,
                  deadline: float) -> Outcome:
    out = Outcome(job_id)
    headers = {"Authorization": f"Bearer {key}"}
    while time.time() < deadline:
        out.requests += 1
        try:
            async with session.get(f"{api}/v1/jobs/{job_id}", params={"wait": str(wait)}, headers=headers) as r:
                body = await r.json(content_type=None)
                if r.status == 429:
                    out.http_errors += 1
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                if r.status != 200:
                    out.http_errors += 1
                    out.error = f"HTTP {r.status}: {body}"
                    return out
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            return out
        if body["status"] in TERMINAL:
            out.status, out.heard_at = body["status"], time.time()
            return out
    out.error = "gave up: the job did not finish in time"
    return out


async def follow_all(api: str, jobs: dict[str, str], *, wait: int = 60, timeout: float = 600) -> list[Outcome]:
    """Long-poll every job (id → its tenant's API key) at once, each until it finishes."""
    deadline = time.time() + timeout
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=wait + 60, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        return await asyncio.gather(*(_follow(session, api, key, job_id, wait, deadline)
                                      for job_id, key in jobs.items()))
