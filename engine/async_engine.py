"""AsyncLLMEngine: one background loop stepping the engine, one async stream per request.

The model runs in a single worker thread, so the event loop stays responsive. Build it with
``from_config`` so the model is also loaded (and compiled) on that thread: libgomp throttles
its spin-waiting once a process holds more OpenMP threads than cores, and every thread that
runs a parallel torch op keeps a team of its own, so loading on one thread and stepping on
another made each decode step ~2.5x slower on two cores. All engine mutation happens on
that thread: ``generate`` validates on the caller's side (so bad input
fails at once, costing nothing), then hands the request over through a locked inbox that
the worker drains before each step; aborts go the same way.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from .core.config import EngineConfig
from .core.sampling_params import SamplingParams
from .llm_engine import LLMEngine
from .outputs import RequestOutput

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has died; no request can be served."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


class RequestFailedError(RuntimeError):
    """The request failed inside an engine step (finish_reason "error"); others went on."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._streams: dict[str, RequestStream] = {}
        self._inbox_lock = threading.Lock()
        self._adds: list[tuple] = []
        self._aborts: list[str] = []
        self._executor = executor or _worker()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.dead_error: BaseException | None = None
        self.on_dead: list = []  # callbacks (the error), run on the event loop when it dies
        self.stats = engine.get_stats()  # refreshed by the worker after every step

    @classmethod
    def from_config(cls, config: EngineConfig,
                    max_waiting_requests: int | None = None) -> "AsyncLLMEngine":
        """The engine built on the worker thread that will step it (see the module doc)."""
        executor = _worker()
        try:
            engine = executor.submit(LLMEngine, config).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(engine, max_waiting_requests, executor)

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop; requests still open end with EngineDeadError (never a hung
        stream: a registry stops an unloaded version whose requests outlived its drain)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError("the engine was stopped"))
        self._executor.shutdown(wait=True)

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and self.dead_error is None

    @property
    def num_streams(self) -> int:
        """Requests with an open stream (added and not yet closed)."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting (a request with n completions counts n)."""
        return self.stats["num_waiting"] + sum(params.n for _, _, params, *_ in self._adds)

    # ---- requests ----------------------------------------------------------------------
    def validate(self, prompt, params: SamplingParams | None = None) -> dict:
        """Tokenize and check a prompt (and params against the model); returns
        {"prompt", "prompt_token_ids"} or raises ValueError. Thread-safe: servers call it
        off the event loop, since tokenizing a long prompt takes a while."""
        if params is not None:
            self.engine.check_params(params)
        text, ids = self.engine.tokenize(prompt)
        self.engine.validate_prompt(ids)
        return {"prompt": text, "prompt_token_ids": ids}

    def check_capacity(self, num_seqs: int) -> None:
        """Raise QueueFullError unless ``num_seqs`` more sequences may wait now."""
        limit = self.max_waiting_requests
        if limit is None:
            return
        if num_seqs > limit:
            raise ValueError(f"the request asks for {num_seqs} sequences (prompts x n); this "
                             f"server queues at most {limit}.")
        if self.num_waiting + num_seqs > limit:
            raise QueueFullError(f"{self.num_waiting} sequences are already waiting")

    def add_request(self, request_id: str, prompt, params: SamplingParams,
                    arrival_time: float | None = None, lora_request=None) -> "RequestStream":
        """Queue a request and return its stream; raises at once on bad input, a full
        queue or a dead engine, so callers can answer before starting a response."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running") from self.dead_error
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        checked = self.validate(prompt, params)  # bad input is a 400 even when the queue is full
        self.check_capacity(params.n)
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        with self._inbox_lock:
            self._adds.append((request_id, checked, params, arrival_time, lora_request))
        self._wake.set()
        return stream

    async def generate(self, request_id: str, prompt, params: SamplingParams,
                       arrival_time: float | None = None,
                       lora_request=None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until finished; leaving early aborts the request."""
        stream = self.add_request(request_id, prompt, params, arrival_time, lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def _forget(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    # ---- the loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._has_work():
                    self._wake.clear()
                    await self._wake.wait()
                outputs, errors = await loop.run_in_executor(self._executor, self._step)
                for request_id, error in errors:
                    self._deliver(request_id, error)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine loop died")
            self.dead_error = e
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"engine loop died: {e!r}"))
            for callback in self.on_dead:
                callback(e)

    def _has_work(self) -> bool:
        return bool(self._adds or self._aborts or self.engine.has_unfinished_requests())

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, RequestOutput) and item.error is not None:
            stream.put(item)  # the partial outputs, then the error
            item = RequestFailedError(f"request failed inside the engine: {item.error}")
        stream.put(item)

    def _step(self):
        """Worker thread: apply the inbox, then run one engine step."""
        with self._inbox_lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        errors = []
        for request_id, prompt, params, arrival, lora in adds:
            try:
                self.engine.add_request(request_id, prompt, params, arrival, lora)
            except Exception as e:  # noqa: BLE001 - this request's fault or bug, not the loop's
                errors.append((request_id, e if isinstance(e, ValueError)
                               else RequestFailedError(f"could not add the request: {e!r}")))
        if aborts:
            self.engine.abort_request(aborts)
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        self.stats = self.engine.get_stats()
        return outputs, errors


def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvserve-engine")


class RequestStream:
    """Async iterator over one request's cumulative outputs. ``close()`` (always call it,
    e.g. in ``finally``) aborts the request if it has not finished, freeing its KV blocks.

    Outputs are cumulative, so the stream holds only the newest one: a reader slower than
    the engine gets its deltas coalesced, and memory per stream stays bounded."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.finished = False
        self.closed = False

    def put(self, item) -> None:
        """Event loop: the newest output (replacing an unread one) or a terminal error."""
        if isinstance(item, BaseException):
            self._error = self._error or item
        else:
            self._latest = item
        self._ready.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self.finished:
                raise StopAsyncIteration
            if self._latest is not None:
                item, self._latest = self._latest, None
                self.finished = item.finished and self._error is None
                return item
            if self._error is not None:
                self.finished = True
                raise self._error
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine._forget(self.request_id, self.finished)
