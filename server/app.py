"""Starlette routes: OpenAI-compatible completions/chat (streamed with SSE), models, health,
metrics, version, and the Triton generate extension. The server parses, calls the async
engine and shapes responses; all generation logic lives in engine/."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from engine.tokenizer import render_chat

from . import protocol as P
from .metrics import Metrics
from .streams import ChoiceState, merge

logger = logging.getLogger("kvserve.server")
VERSION = "0.1.0"


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    request_timeout: float | None = None  # seconds; None = no deadline
    max_body_bytes: int = 8 << 20


def build_app(async_engine: AsyncLLMEngine, settings: ServerSettings) -> Starlette:
    api = _API(async_engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.stop()

    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_endpoint, methods=["GET"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/v2/health/ready", api.health, methods=["GET"]),
        Route("/v2/models/{model}", api.triton_model, methods=["GET"]),
        Route("/v2/models/{model}/generate", api.triton_generate, methods=["POST"]),
        Route("/v2/models/{model}/generate_stream", api.triton_generate_stream, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def error_response(err: P.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _guarded(handler):
    """Auth, then the handler; every failure becomes an OpenAI-shaped error response."""
    async def wrapped(self: "_API", request: Request):
        try:
            self.check_auth(request)
            return await handler(self, request)
        except P.APIError as e:
            return error_response(e)
        except QueueFullError as e:
            return error_response(P.APIError(503, f"server overloaded: {e}; retry later",
                                             "server_overloaded", headers={"Retry-After": "1"}))
        except EngineDeadError as e:
            return error_response(P.APIError(503, str(e), "engine_dead"))
        except Exception:  # noqa: BLE001 - our bug: report it, keep serving
            logger.exception("internal error on %s", request.url.path)
            return error_response(P.APIError(500, "internal server error", "internal_error"))
    wrapped.__name__ = handler.__name__
    return wrapped


class _API:
    def __init__(self, async_engine: AsyncLLMEngine, settings: ServerSettings) -> None:
        self.engine = async_engine
        self.settings = settings
        self.tokenizer = async_engine.engine.tokenizer
        self.token_text = P.TokenText(self.tokenizer)
        self.metrics = Metrics(async_engine)

    # ---- plumbing ----------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None or not request.url.path.startswith(("/v1/", "/v2/models")):
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise P.APIError(401, "invalid or missing API key", "authentication_error",
                             code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise P.APIError(413, f"request body over {limit} bytes", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise P.APIError(413, f"request body over {limit} bytes", code="request_too_large")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise P.APIError(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise P.APIError(400, "request body must be a JSON object")
        return body

    def check_model(self, name) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise P.APIError(404, f"The model `{name}` does not exist.", param="model",
                             code="model_not_found")

    def start_streams(self, request_id: str, prompts: list, params) -> list:
        """Queue every prompt (all validated first, so a bad one queues nothing)."""
        checked = []
        for i, p in enumerate(prompts):
            try:
                checked.append(self.engine.validate(p))
            except ValueError as e:
                raise P.bad_field("prompt" if len(prompts) == 1 else f"prompt[{i}]", str(e)) from e
        streams = []
        try:
            for i, c in enumerate(checked):
                streams.append(self.engine.add_request(f"{request_id}-{i}", c, params))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def run_to_end(self, request: Request, streams, timer):
        """Non-streamed: the final output of each prompt. A client that hangs up or a passed
        deadline aborts the requests."""
        finals: list = [None] * len(streams)

        async def collect():
            async for i, out in merge(streams):
                timer.on_output(out, 1)
                finals[i] = out

        await self.with_deadline(_until_disconnect(request, collect()))
        return finals

    async def with_deadline(self, coro):
        timeout = self.settings.request_timeout
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except TimeoutError as e:
            raise P.APIError(504, f"request exceeded the {timeout}s deadline and was aborted",
                             "timeout_error", code="request_timeout") from e

    # ---- OpenAI endpoints --------------------------------------------------------------
    @_guarded
    async def completions(self, request: Request):
        body = await self.read_json(request)
        self.check_model(P.field(body, "model", "str"))
        prompts = P.completion_prompts(body)
        logprobs = P.field(body, "logprobs", "int")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise P.bad_field("logprobs", "'logprobs' must be between 0 and 20.")
        params = P.sampling_params(body, P.field(body, "max_tokens", "int", 16), logprobs)
        echo = P.field(body, "echo", "bool", False)
        stream = P.field(body, "stream", "bool", False)
        opts = P.stream_options(body)
        rid = P.new_id("cmpl")
        streams = self.start_streams(rid, prompts, params)
        ctx = _CompletionShaper(self, rid, params, echo, logprobs)
        timer = self.metrics.timer()
        if stream:
            return EventSourceResponse(self.sse(streams, ctx, timer, opts), ping=15)
        finals = await self.run_to_end(request, streams, timer)
        timer.finish("ok", *ctx.token_counts(finals))
        return JSONResponse(ctx.full_response(finals))

    @_guarded
    async def chat(self, request: Request):
        body = await self.read_json(request)
        self.check_model(P.field(body, "model", "str"))
        messages = body.get("messages")
        try:
            prompt = render_chat(self.tokenizer, messages,
                                 P.field(body, "add_generation_prompt", "bool", True),
                                 P.field(body, "chat_template_kwargs", "dict"))
        except ValueError as e:
            raise P.bad_field("messages", str(e)) from e
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault
            raise P.bad_field("messages", f"chat template failed: {e}") from e
        want_logprobs = P.field(body, "logprobs", "bool", False)
        top = P.field(body, "top_logprobs", "int")
        if top is not None and not 0 <= top <= 20:
            raise P.bad_field("top_logprobs", "'top_logprobs' must be between 0 and 20.")
        if top and not want_logprobs:
            raise P.bad_field("top_logprobs", "'top_logprobs' needs 'logprobs': true.")
        max_tokens = P.field(body, "max_completion_tokens", "int",
                             P.field(body, "max_tokens", "int"))
        params = P.sampling_params(body, max_tokens, (top or 0) if want_logprobs else None)
        stream = P.field(body, "stream", "bool", False)
        opts = P.stream_options(body)
        rid = P.new_id("chatcmpl")
        streams = self.start_streams(rid, [prompt], params)
        ctx = _ChatShaper(self, rid, params, top or 0)
        timer = self.metrics.timer()
        if stream:
            return EventSourceResponse(self.sse(streams, ctx, timer, opts), ping=15)
        finals = await self.run_to_end(request, streams, timer)
        timer.finish("ok", *ctx.token_counts(finals))
        return JSONResponse(ctx.full_response(finals))

    async def sse(self, streams, ctx, timer, opts: P.StreamOptions):
        """One SSE event per delta; [DONE] at the end. Cancellation (client gone) aborts."""
        outcome = "aborted"
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                for chunk in ctx.opening_chunks(opts):
                    yield {"data": json.dumps(chunk)}
                finals: list = [None] * len(streams)
                async for i, out in merge(streams):
                    finals[i] = out
                    for chunk, new_tokens in ctx.delta_chunks(i, out, opts):
                        timer.on_output(out, new_tokens)
                        yield {"data": json.dumps(chunk)}
            if opts.include_usage:
                yield {"data": json.dumps(ctx.usage_chunk(finals))}
            yield {"data": "[DONE]"}
            outcome = "ok"
            timer.finish(outcome, *ctx.token_counts(finals))
        except TimeoutError:
            outcome = "timeout"
            err = P.APIError(504, "request exceeded its deadline and was aborted", "timeout_error",
                             code="request_timeout")
            yield {"data": json.dumps(err.body())}
            yield {"data": "[DONE]"}
        except (EngineDeadError, ValueError) as e:
            outcome = "error"
            yield {"data": json.dumps(P.APIError(503 if isinstance(e, EngineDeadError) else 400,
                                                 str(e)).body())}
            yield {"data": "[DONE]"}
        finally:
            for s in streams:
                s.close()
            if outcome != "ok":
                self.metrics.requests.labels(outcome).inc()

    async def models(self, request: Request):
        try:
            self.check_auth(request)
        except P.APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [{
            "id": self.settings.served_model_name, "object": "model", "created": P.now(),
            "owned_by": "kvserve", "max_model_len": self.engine.engine.max_model_len}]})

    async def health(self, request: Request):
        if self.engine.is_running:
            return Response(status_code=200)
        return JSONResponse({"error": {"message": "engine loop is not running", "type": "engine_dead",
                                       "param": None, "code": None}}, status_code=503)

    async def metrics_endpoint(self, request: Request):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def version(self, request: Request):
        return JSONResponse({"version": VERSION})

    # ---- Triton generate extension -----------------------------------------------------
    def triton_request(self, request: Request, body: dict):
        name = request.path_params["model"]
        if name != self.settings.served_model_name:
            raise P.APIError(404, f"The model `{name}` does not exist.", param="model",
                             code="model_not_found")
        text = P.field(body, "text_input", "str")
        if text is None:
            raise P.bad_field("text_input", "'text_input' is required.")
        fields = {**P.field(body, "parameters", "dict", {}), **body}
        if "stop_words" in fields and "stop" not in fields:  # TensorRT-LLM spelling
            fields["stop"] = fields["stop_words"] or None
        params = P.sampling_params(fields, P.field(fields, "max_tokens", "int", 64), None)
        return text, params

    @_guarded
    async def triton_model(self, request: Request):
        self.triton_request(request, {"text_input": ""})
        return JSONResponse({"name": self.settings.served_model_name, "versions": ["1"],
                             "platform": "kvserve",
                             "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
                             "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]})

    @_guarded
    async def triton_generate(self, request: Request):
        text, params = self.triton_request(request, await self.read_json(request))
        streams = self.start_streams(P.new_id("trt"), [text], params)
        timer = self.metrics.timer()
        finals = await self.run_to_end(request, streams, timer)
        out = finals[0].outputs[0]
        timer.finish("ok", len(finals[0].prompt_token_ids), len(out.token_ids))
        return JSONResponse({"model_name": self.settings.served_model_name, "model_version": "1",
                             "text_output": out.text})

    @_guarded
    async def triton_generate_stream(self, request: Request):
        text, params = self.triton_request(request, await self.read_json(request))
        streams = self.start_streams(P.new_id("trt"), [text], params)
        name = self.settings.served_model_name

        async def events():
            state = ChoiceState()
            try:
                async for _, out in merge(streams):
                    delta, _ = state.advance(out.outputs[0])
                    if delta or out.finished:
                        yield {"data": json.dumps({"model_name": name, "model_version": "1",
                                                   "text_output": delta})}
            finally:
                streams[0].close()
        return EventSourceResponse(events(), ping=15)


async def _until_disconnect(request: Request, coro):
    """Run coro; if the client hangs up first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise P.APIError(499, "client closed the request", code="client_closed")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class _Shaper:
    """Shared response shaping for completions and chat."""

    object_full = object_chunk = ""

    def __init__(self, api: _API, request_id: str, params, top_n: int) -> None:
        self.api, self.id, self.params, self.top_n = api, request_id, params, top_n
        self.created = P.now()
        self.model = api.settings.served_model_name
        self.states: dict[tuple[int, int], ChoiceState] = {}

    def index(self, prompt_idx: int, child_idx: int) -> int:
        return prompt_idx * self.params.n + child_idx

    def token_counts(self, finals) -> tuple[int, int]:
        prompt = sum(len(f.prompt_token_ids) for f in finals if f is not None)
        generated = sum(len(c.token_ids) for f in finals if f is not None for c in f.outputs)
        return prompt, generated

    def usage(self, finals) -> dict:
        cached = sum(f.num_cached_tokens for f in finals if f is not None)
        return P.usage(*self.token_counts(finals), cached)

    def chunk(self, choices: list, opts: P.StreamOptions) -> dict:
        out = {"id": self.id, "object": self.object_chunk, "created": self.created,
               "model": self.model, "choices": choices}
        if opts.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, finals) -> dict:
        return {"id": self.id, "object": self.object_chunk, "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage(finals)}

    def opening_chunks(self, opts):
        return []

    def delta_chunks(self, prompt_idx: int, out, opts):
        for c in out.outputs:
            state = self.states.setdefault((prompt_idx, c.index), ChoiceState())
            if state.done:
                continue
            first = state.sent_tokens
            delta, new_tokens = state.advance(c)
            reason = P.finish_reason(c) if c.finished else None
            if reason is not None:
                state.done = True
            if not delta and reason is None and not (self.params.logprobs is not None and new_tokens):
                continue
            choice = self.delta_choice(self.index(prompt_idx, c.index), c, delta, first, reason,
                                       out, state)
            yield self.chunk([choice], opts), new_tokens


class _CompletionShaper(_Shaper):
    object_full = object_chunk = "text_completion"

    def __init__(self, api, request_id, params, echo: bool, logprobs: int | None) -> None:
        super().__init__(api, request_id, params, logprobs or 0)
        self.echo = echo

    def prompt_text(self, out) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.api.tokenizer.decode(out.prompt_token_ids)

    def logprobs(self, c, start: int, offset: int):
        if self.params.logprobs is None:
            return None
        return P.completion_logprobs(self.api.token_text, c.token_ids[start:],
                                     c.logprobs[start:], self.top_n, offset)

    def full_response(self, finals) -> dict:
        choices = []
        for p, f in enumerate(finals):
            prefix = self.prompt_text(f) if self.echo else ""
            for c in f.outputs:
                choices.append({"index": self.index(p, c.index), "text": prefix + c.text,
                                "logprobs": self.logprobs(c, 0, len(prefix)),
                                "finish_reason": P.finish_reason(c), "stop_reason": c.stop_reason})
        choices.sort(key=lambda c: c["index"])
        return {"id": self.id, "object": self.object_full, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage(finals)}

    def delta_choice(self, index, c, delta, first, reason, out, state) -> dict:
        if self.echo and not state.echoed:
            state.echoed = True
            delta = self.prompt_text(out) + delta
        return {"index": index, "text": delta, "logprobs": self.logprobs(c, first, 0),
                "finish_reason": reason, "stop_reason": c.stop_reason if reason else None}


class _ChatShaper(_Shaper):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def logprobs(self, c, start: int):
        if self.params.logprobs is None:
            return None
        return P.chat_logprobs(self.api.token_text, c.token_ids[start:], c.logprobs[start:],
                               self.top_n)

    def full_response(self, finals) -> dict:
        f = finals[0]
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(c, 0), "finish_reason": P.finish_reason(c),
                    "stop_reason": c.stop_reason} for c in f.outputs]
        return {"id": self.id, "object": self.object_full, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage(finals)}

    def opening_chunks(self, opts):
        # OpenAI sends the role first, in its own chunk per choice.
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}], opts)
                for i in range(self.params.n)]

    def delta_choice(self, index, c, delta, first, reason, out, state) -> dict:
        return {"index": index, "delta": {"content": delta} if delta else {},
                "logprobs": self.logprobs(c, first), "finish_reason": reason}
