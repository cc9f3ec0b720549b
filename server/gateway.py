"""The one way into the async engine for every front end (OpenAI, Triton generate, KServe v2
over HTTP and gRPC): prompts are rendered, tokenized and checked off the event loop, the
queue bound is checked for the whole request, then every prompt is queued at once."""
from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor

from engine.async_engine import AsyncLLMEngine
from engine.core.lora import LoRARequest

from . import protocol as P
from .metrics import Metrics


# SamplingParams fields that LLMEngine.check_params judges against the loaded model
_MODEL_CHECKED = {"top_k", "logit_bias"}


class Gateway:
    def __init__(self, async_engine: AsyncLLMEngine, prepare_timeout: float,
                 model_name: str = "") -> None:
        self.engine = async_engine
        self.model_name = model_name
        # LoRA adapters served by name ("model": "<adapter>"), each a LoRARequest
        self.loras: dict[str, LoRARequest] = {}
        self._lora_ids = itertools.count(1)
        self.tokenizer = async_engine.engine.tokenizer
        self.prepare_timeout = prepare_timeout
        self.metrics = Metrics(async_engine)
        # Chat templates and tokenizing run here, never on the event loop. One thread: a
        # fast tokenizer is not safe to share between concurrent encodes.
        self.prep_pool = ThreadPoolExecutor(1, thread_name_prefix="kvserve-prep")

    def close(self) -> None:
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    # ---- models and adapters -----------------------------------------------------------
    def model(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's model name selects (None: the base model); 404 if it
        names neither."""
        if name is None or name == self.model_name:
            return None
        lora = self.loras.get(name)
        if lora is None:
            raise P.APIError(404, f"The model `{name:.200}` does not exist.", param="model",
                             code="model_not_found")
        return lora

    def _new_lora(self, name, path) -> LoRARequest:
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise P.APIError(400, "lora_name and lora_path must be non-empty strings.")
        if name == self.model_name or name in self.loras:
            raise P.APIError(400, f"a model named {name!r:.200} is already being served.",
                             param="lora_name")
        if self.engine.engine.runner.lora is None:
            raise P.APIError(400, "this server was started without LoRA (--enable-lora or "
                                  "--lora-modules).", param="lora_name")
        return LoRARequest(name, next(self._lora_ids), path)

    def load_lora_now(self, name: str, path: str) -> None:
        """At start-up (before serving): a bad adapter raises and fails the start."""
        lora = self._new_lora(name, path)
        self.engine.engine.resolve_lora(lora)
        self.loras[name] = lora

    async def add_lora(self, name, path) -> LoRARequest:
        """Load and check an adapter (off the event loop), then serve it under ``name``."""
        lora = self._new_lora(name, path)
        await self.run_prep(lambda: self.engine.engine.resolve_lora(lora))
        self.loras[name] = lora
        return lora

    def remove_lora(self, name) -> None:
        """Stop serving an adapter: new requests get 404; the ones in flight finish on it."""
        if self.loras.pop(name, None) is None:
            raise P.APIError(404, f"no LoRA adapter named {name!r:.200}.", param="lora_name",
                             code="model_not_found")

    # ---- requests -----------------------------------------------------------------------
    async def start_streams(self, request_id: str, prompts: list, params,
                            param: str = "prompt", lora: LoRARequest | None = None) -> list:
        """Queue every prompt (all rendered and validated first, off the event loop, so a
        bad one queues nothing); a request's sequences (prompts x n) are admitted together.
        Raises P.APIError (400, 503), QueueFullError or EngineDeadError."""
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
