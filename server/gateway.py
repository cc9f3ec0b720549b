"""The one way into the async engine for every front end (OpenAI, Triton generate, KServe v2
over HTTP and gRPC): prompts are rendered, tokenized and checked off the event loop, the
queue bound is checked for the whole request, then every prompt is queued at once."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from engine.async_engine import AsyncLLMEngine
from engine.core.lora import LoRARequest

from . import protocol as P


# SamplingParams fields that LLMEngine.check_params judges against the loaded model
_MODEL_CHECKED = {"top_k", "logit_bias"}


class Gateway:
    """One engine's front door. Per engine, not per server: a registry holds one for each
    loaded full model version (LoRA versions share their base's)."""

    def __init__(self, async_engine: AsyncLLMEngine, prepare_timeout: float) -> None:
        self.engine = async_engine
        self.tokenizer = async_engine.engine.tokenizer
        self.token_text = P.TokenText(self.tokenizer)
        self.tool_parser = None  # set by the server from --tool-call-parser and the template
        self.prepare_timeout = prepare_timeout
        # Requests between routing and their streams' start (a draining version waits
        # for these, then for its streams).
        self.pending = 0
        # Chat templates and tokenizing run here, never on the event loop. One thread: a
        # fast tokenizer is not safe to share between concurrent encodes.
        self.prep_pool = ThreadPoolExecutor(1, thread_name_prefix="kvserve-prep")

    def close(self) -> None:
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def idle(self) -> bool:
        """No request is being prepared, streamed or run on this engine."""
        return self.pending == 0 and self.engine.num_streams == 0 \
            and not self.engine.engine.has_unfinished_requests()

    # ---- requests -----------------------------------------------------------------------
    async def start_streams(self, request_id: str, prompts: list, params,
                            param: str = "prompt", lora: LoRARequest | None = None) -> list:
        """Queue every prompt (all rendered and validated first, off the event loop, so a
        bad one queues nothing); a request's sequences (prompts x n) are admitted together.
        Raises P.APIError (400, 503), QueueFullError or EngineDeadError."""
        self.pending += 1  # first, before any await: see server/registry/registry.py
        try:
            return await self._start_streams(request_id, prompts, params, param, lora)
        finally:
            self.pending -= 1

    async def _start_streams(self, request_id, prompts, params, param, lora) -> list:
        loop = asyncio.get_running_loop()
        if lora is not None:  # its files may have changed since it was loaded: re-checked
            try:
                await self.run_prep(lambda: self.engine.engine.resolve_lora(lora))
            except P.APIError as e:
                e.param = "model"
                raise
        checked = []
        for i, p in enumerate(prompts):
            name = param if len(prompts) == 1 else f"{param}[{i}]"
            job = loop.run_in_executor(self.prep_pool, self._prepare, p, params)
            try:
                async with asyncio.timeout(self.prepare_timeout):
                    checked.append(await job)
            except TimeoutError as e:  # a long queue for the prep thread, or a slow template
                raise P.APIError(503, f"preparing the prompt took over "
                                      f"{self.prepare_timeout}s; retry later",
                                 "server_overloaded", param=name,
                                 headers={"Retry-After": "1"}) from e
            except ValueError as e:  # the prompt's fault, or a field only the model can judge
                field = str(e).split(" ", 1)[0]
                raise P.bad_field(field if field in _MODEL_CHECKED else name, str(e)) from e
        if params.structured_outputs is not None:
            await self._compile(params.structured_outputs)
        try:
            self.engine.check_capacity(len(checked) * params.n)
        except ValueError as e:
            raise P.bad_field("n", str(e)) from e
        streams = []
        try:
            for i, c in enumerate(checked):
                streams.append(self.engine.add_request(f"{request_id}-{i}", c, params,
                                                       lora_request=lora))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def _compile(self, spec) -> None:
        """The request's grammar, compiled on the grammar thread (cached for the engine):
        neither the event loop nor other requests' preparation waits for it."""
        engine = self.engine.engine
        try:
            async with asyncio.timeout(engine.config.grammar_compile_timeout):
                await asyncio.wrap_future(engine.grammars.submit(spec))
        except TimeoutError as e:
            raise P.APIError(400, f"compiling the grammar took over "
                                  f"{engine.config.grammar_compile_timeout}s") from e
        except ValueError as e:
            raise P.APIError(400, str(e)) from e

    async def run_prep(self, fn):
        """fn() on the preparation thread (tokenizers are not shared between threads), with
        the same time bound as a prompt's preparation."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.prepare_timeout):
                return await loop.run_in_executor(self.prep_pool, fn)
        except TimeoutError as e:
            raise P.APIError(503, f"preparing the request took over {self.prepare_timeout}s; "
                                  "retry later", "server_overloaded",
                             headers={"Retry-After": "1"}) from e
        except ValueError as e:
            raise P.APIError(400, str(e)) from e

    def _prepare(self, prompt, params) -> dict:
        """Prep thread: render (chat) and tokenize one prompt, and check it and params."""
        return self.engine.validate(prompt() if callable(prompt) else prompt, params)
