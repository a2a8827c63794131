"""SimulatedEngine: a stand-in for vLLM, for orchestration tests and benchmarks ONLY.

It exists so that routing, failover and queueing can be exercised with hundreds of jobs on several
nodes of chosen speeds, which real vLLM on a 2-core CPU cannot do. It generates no text worth reading.

Model: like a GPU engine with continuous batching, up to `max_num_seqs` requests advance together, one
token per step of `token_seconds`, so a request of n output tokens takes n × token_seconds once
scheduled and a node's throughput is max_num_seqs / token_seconds tokens per second. Requests beyond
`max_num_seqs` wait their turn. Select it with SWITCHYARD_ENGINE=simulated; SWITCHYARD_SIM_TOKEN_SECONDS
sets the speed.

Fault injection (tests only): a prompt containing `crash_marker` kills the whole worker process the
moment it is scheduled, like a poison request that takes its worker down; a prompt containing
`fail_marker` fails its job's first attempt with an exception no engine adapter recognises.

It counts what vLLM's statistics count where it can (requests running and waiting, prompt and
generation tokens; only ever changed on its event loop), reported under vLLM's metric names by
tasks.metrics.engine so orchestration runs fill the same panels.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Future

from workers.engine import Completion

log = logging.getLogger(__name__)


class SimulatedEngine:
    supports_seed = True

    def __init__(self, *, token_seconds: float, max_num_seqs: int, tokenizer, crash_marker: str | None = None,
                 fail_marker: str | None = None):
        self.token_seconds, self.max_num_seqs = token_seconds, max_num_seqs
        self.tokenizer, self.crash_marker, self.fail_marker = tokenizer, crash_marker, fail_marker
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-engine", daemon=True)
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots: asyncio.Semaphore | None = None
        self.state, self.restarts, self.generation = "stopped", 0, 1
        self.running = self.waiting = self.prompt_tokens = self.generation_tokens = 0

    def start(self) -> None:
        self._thread.start()

        async def make():
            return asyncio.Semaphore(self.max_num_seqs)

        self._slots = asyncio.run_coroutine_threadsafe(make(), self._loop).result()
        self.state = "ready"
        log.warning("SIMULATED engine (%.4f s/token, %d sequences): outputs are not model text",
                    self.token_seconds, self.max_num_seqs)

    def probe(self) -> str:
        return self.state

    def restart(self, seen_generation: int) -> None:  # nothing to rebuild
        pass

    def shutdown(self) -> None:
        self.state = "stopped"
        self._loop.call_soon_threadsafe(self._loop.stop)

    def submit(self, request_id: str, prompt_ids: list[int], sampling: dict, *,
               cache_salt: str | None = None, on_delta=None) -> tuple[Future, int]:
        future: Future = Future()

        def schedule():
            task = self._loop.create_task(self._generate(request_id, prompt_ids, sampling, on_delta))
            self._tasks[request_id] = task

            def done(t: asyncio.Task):
                self._tasks.pop(request_id, None)
                if t.cancelled():
                    future.set_result(Completion("", "abort", len(prompt_ids), 0))
                elif t.exception() is not None:
                    future.set_exception(t.exception())
                else:
                    future.set_result(t.result())

            task.add_done_callback(done)

        self._loop.call_soon_threadsafe(schedule)
        return future, self.generation

    async def _generate(self, request_id: str, prompt_ids: list[int], sampling: dict, on_delta=None) -> Completion:
        tokens = int(sampling.get("max_tokens") or 16)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.prompt_tokens += len(prompt_ids)
        try:
            text = self.tokenizer.decode(prompt_ids) if self.crash_marker or self.fail_marker else ""
            if self.crash_marker and self.crash_marker in text:
                log.error("simulated poison request: killing this worker process")
                os._exit(137)
            if self.fail_marker and self.fail_marker in text and request_id.endswith(":1"):
                raise RuntimeError("simulated engine failure of a kind no adapter recognises")
            if on_delta is None:
                await asyncio.sleep(tokens * self.token_seconds)
            else:  # streamed: one numbered word a step, so a reader can tell a lost or repeated piece
                for i in range(tokens):
                    await asyncio.sleep(self.token_seconds)
                    on_delta(f"w{i} ")
        finally:
            self.running -= 1
            self._slots.release()
        self.generation_tokens += tokens
        if on_delta is not None:
            return Completion("".join(f"w{i} " for i in range(tokens)), "length", len(prompt_ids), tokens)
        return Completion(f"[simulated output: {tokens} tokens]", "length", len(prompt_ids), tokens)

    def abort(self, request_id: str) -> None:
        def cancel():
            task = self._tasks.get(request_id)
            if task is not None:
                task.cancel()

        self._loop.call_soon_threadsafe(cancel)
