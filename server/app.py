"""Starlette routes: OpenAI-compatible completions/chat (streamed with SSE), models, health,
metrics, version, and the Triton generate extension. The server parses, calls the async
engine and shapes responses; all generation logic lives in engine/."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import pathlib
import signal
from collections.abc import Callable
from dataclasses import dataclass

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError, RequestFailedError
from engine.core.lora import LoRARequest

from . import protocol as P
from .gateway import Gateway
from .http_body import read_body, until_disconnect
from .kserve.http import KServeHTTP
from .kserve.service import InferService
from .shaping import ChatShaper, CompletionShaper
from .streams import ChoiceState, merge
from .tools.parsers import parser_for

logger = logging.getLogger("kvserve.server")
_PLAYGROUND = pathlib.Path(__file__).parent / "static" / "playground.html"
VERSION = "0.1.0"


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    request_timeout: float | None = None  # seconds; None = no deadline
    max_body_bytes: int = 8 << 20
    body_read_timeout: float = 30.0  # seconds for a request body to arrive in full
    # Rendering a chat template and tokenizing run on a thread; past this many seconds the
    # request gets a 503 (the thread is not interrupted: keep templates from clients off).
    prepare_timeout: float = 10.0
    trust_request_chat_template: bool = False
    # If the engine loop dies: stop the server after this many seconds (so that open
    # streams get their error event first) and let a supervisor restart it. None: stay up.
    exit_on_engine_death_after: float | None = None
    # How to stop it (set by `kvserve serve` to end uvicorn's loop, so that the process then
    # exits with status 1); None: SIGTERM to this process.
    request_shutdown: Callable[[], None] | None = None
    # KServe v2 over gRPC, started with the app on its event loop; None or 0: off.
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    # gRPC's own default (4 MB) would turn a long prompt into a transport error; past the
    # engine's prompt limits the request gets a clear INVALID_ARGUMENT instead.
    grpc_max_message_bytes: int = 64 << 20
    # Tool calls: the model's format (auto: read off the chat template; none; hermes;
    # smollm2) and a chat template to use instead of the tokenizer's (its text).
    tool_call_parser: str = "auto"
    chat_template: str | None = None
    # LoRA adapters served from the start (name -> PEFT directory; the engine needs
    # enable_lora), and whether POST /v1/load_lora_adapter and /unload_lora_adapter work.
    lora_modules: dict[str, str] | None = None
    allow_runtime_lora_updates: bool = False


def build_app(async_engine: AsyncLLMEngine, settings: ServerSettings) -> Starlette:
    api = _API(async_engine, settings)
    kserve = InferService(api.gateway, settings.served_model_name,
                          request_timeout=settings.request_timeout)
    v2_http = KServeHTTP(kserve, api.check_auth, VERSION, settings.max_body_bytes,
                         settings.body_read_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        if settings.exit_on_engine_death_after is not None:
            async_engine.on_dead.append(lambda e: _exit_later(settings))
        grpc_server = None
        try:
            if settings.grpc_port:
                from .kserve.grpc_server import start_grpc_server

                grpc_server = await start_grpc_server(
                    kserve, settings.grpc_host, settings.grpc_port, settings.api_key, VERSION,
                    settings.grpc_max_message_bytes)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)  # cancels open calls: their requests abort
            api.gateway.close()
            await async_engine.stop()

    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/load_lora_adapter", api.load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", api.unload_lora_adapter, methods=["POST"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_endpoint, methods=["GET"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/v2/models/{model}/generate", api.triton_generate, methods=["POST"]),
        Route("/v2/models/{model}/generate_stream", api.triton_generate_stream, methods=["POST"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/", api.playground, methods=["GET"]),
        *v2_http.routes(),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


def _exit_later(settings: ServerSettings) -> None:
    grace = settings.exit_on_engine_death_after
    logger.error("engine loop died: stopping the server in %.1f s", grace)
    stop = settings.request_shutdown or (lambda: os.kill(os.getpid(), signal.SIGTERM))
    asyncio.get_running_loop().call_later(grace, stop)


def error_response(err: P.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route 404, 405) in the same JSON shape as ours."""
    return error_response(P.APIError(exc.status_code, str(exc.detail), headers=exc.headers))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s", request.url.path, exc_info=exc)
    return error_response(P.APIError(500, "internal server error", "internal_error"))


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
        except RequestFailedError as e:
            return error_response(P.APIError(500, str(e), "internal_error"))
        except Exception:  # noqa: BLE001 - our bug: report it, keep serving
            logger.exception("internal error on %s", request.url.path)
            return error_response(P.APIError(500, "internal server error", "internal_error"))
    wrapped.__name__ = handler.__name__
    return wrapped


class _API:
    def __init__(self, async_engine: AsyncLLMEngine, settings: ServerSettings) -> None:
        self.engine = async_engine
        self.settings = settings
        self.gateway = Gateway(async_engine, settings.prepare_timeout,
                               settings.served_model_name)
        for name, path in (settings.lora_modules or {}).items():
            self.gateway.load_lora_now(name, path)
        self.start_streams = self.gateway.start_streams
        self.metrics = self.gateway.metrics
        self.tokenizer = self.gateway.tokenizer
        self.token_text = P.TokenText(self.tokenizer)
        if settings.chat_template is not None and self.tokenizer is not None:
            self.tokenizer.chat_template = settings.chat_template
        self.tool_parser = parser_for(settings.tool_call_parser,
                                      getattr(self.tokenizer, "chat_template", None))

    # ---- plumbing ----------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None or not request.url.path.startswith(
                ("/v1/", "/v2/models", "/v2/repository", "/tokenize", "/detokenize")):
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise P.APIError(401, "invalid or missing API key", "authentication_error",
                             code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        return P.parse_json(await read_body(request, self.settings.max_body_bytes,
                                            self.settings.body_read_timeout))

    def check_model(self, name) -> LoRARequest | None:
        """The LoRA adapter a request's ``model`` selects (None: the base); 404 if unknown."""
        return self.gateway.model(name)

    def model_name(self, lora: LoRARequest | None) -> str:
        return self.settings.served_model_name if lora is None else lora.lora_name

    async def run_to_end(self, request: Request, streams, timer):
        """Non-streamed: the final output of each prompt. A client that hangs up or a passed
        deadline aborts the requests."""
        finals: list = [None] * len(streams)

        async def collect():
            async for i, out in merge(streams):
                timer.on_output(out, 1)
                finals[i] = out

        await self.with_deadline(until_disconnect(request, collect()))
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
        lora = self.check_model(P.field(body, "model", "str"))
        req = P.parse_completion(body)
        rid = P.new_id("cmpl")
        streams = await self.start_streams(rid, req.prompts, req.params, lora=lora)
        shaper = CompletionShaper(self.token_text, self.model_name(lora), rid,
                                  req.params, req.echo, req.prompt_logprobs)
        return await self.respond(request, streams, shaper, req, lora)

    @_guarded
    async def chat(self, request: Request):
        body = await self.read_json(request)
        lora = self.check_model(P.field(body, "model", "str"))
        req = P.parse_chat(body, self.tokenizer, self.settings.trust_request_chat_template,
                           self.engine.engine.max_prompt_chars, self.tool_parser)
        rid = P.new_id("chatcmpl")
        streams = await self.start_streams(rid, req.prompts, req.params, "messages", lora)
        shaper = ChatShaper(self.token_text, self.model_name(lora), rid, req.params,
                            req.params.logprobs or 0, req.tools)
        return await self.respond(request, streams, shaper, req, lora)

    async def respond(self, request: Request, streams, shaper, req: P.ParsedRequest,
                      lora: LoRARequest | None = None):
        timer = self.metrics.timer(adapter=None if lora is None else lora.lora_name)
        if req.stream:
            return EventSourceResponse(self.sse(streams, shaper, timer, req.stream_options), ping=15)
        finals = await self.run_to_end(request, streams, timer)
        timer.finish("ok", *shaper.token_counts(finals))
        return JSONResponse(shaper.full_response(finals))

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
        except Exception as e:  # noqa: BLE001 - a stream ends with an error event, never cut
            outcome = "error"
            yield {"data": json.dumps(_stream_error(e).body())}
            yield {"data": "[DONE]"}
        finally:
            for s in streams:
                s.close()
            if outcome != "ok":
                self.metrics.requests.labels(outcome, "openai").inc()

    @_guarded
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: a prompt, or chat messages through the template, to token ids."""
        body = await self.read_json(request)
        self.check_model(P.field(body, "model", "str"))
        special = P.field(body, "add_special_tokens", "bool", True)
        if "messages" in body:
            req = P.parse_chat({**body, "max_tokens": 1}, self.tokenizer,
                               self.settings.trust_request_chat_template,
                               self.engine.engine.max_prompt_chars, self.tool_parser)
            job = req.prompts[0]
        else:
            text = P.field(body, "prompt", "str")
            if text is None:
                raise P.bad_field("prompt", "'prompt' (a string) or 'messages' is required.")
            def job():
                self.engine.engine.check_prompt_chars(len(text))
                return {"prompt_token_ids": self.tokenizer.encode(text,
                                                                  add_special_tokens=special)}
        ids = (await self.gateway.run_prep(job))["prompt_token_ids"]
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.engine.max_model_len,
                             "tokens": ids})

    @_guarded
    async def detokenize(self, request: Request):
        body = await self.read_json(request)
        self.check_model(P.field(body, "model", "str"))
        ids = P.field(body, "tokens", "int_list")
        if ids is None:
            raise P.bad_field("tokens", "'tokens' (a list of token ids) is required.")
        vocab = self.engine.engine.model_config.vocab_size
        if len(ids) > self.engine.engine.max_model_len or any(not 0 <= t < vocab for t in ids):
            raise P.bad_field("tokens", f"'tokens' must be at most max_model_len ids in "
                                        f"[0, {vocab}).")
        text = await self.gateway.run_prep(lambda: self.tokenizer.decode(ids))
        return JSONResponse({"prompt": text})

    async def models(self, request: Request):
        try:
            self.check_auth(request)
        except P.APIError as e:
            return error_response(e)
        base = self.settings.served_model_name
        card = {"object": "model", "created": P.now(), "owned_by": "kvserve",
                "max_model_len": self.engine.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [
            {"id": base, **card, "root": base, "parent": None},
            *({"id": name, **card, "root": lora.lora_path, "parent": base}
              for name, lora in self.gateway.loras.items())]})

    # ---- LoRA adapters at run time (vLLM's shapes) ---------------------------------------
    def _check_runtime_lora(self) -> None:
        if not self.settings.allow_runtime_lora_updates:
            raise P.APIError(404, "loading adapters at run time is off (start the server with "
                                  "--allow-runtime-lora-updates).", code="not_found")

    @_guarded
    async def load_lora_adapter(self, request: Request):
        self._check_runtime_lora()
        body = await self.read_json(request)
        lora = await self.gateway.add_lora(body.get("lora_name"), body.get("lora_path"))
        return Response(f"Success: LoRA adapter '{lora.lora_name}' added successfully.",
                        media_type="text/plain")

    @_guarded
    async def unload_lora_adapter(self, request: Request):
        self._check_runtime_lora()
        body = await self.read_json(request)
        name = body.get("lora_name")
        self.gateway.remove_lora(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.",
                        media_type="text/plain")

    async def health(self, request: Request):
        if self.engine.is_running:
            return Response(status_code=200)
        return JSONResponse({"error": {"message": "engine loop is not running", "type": "engine_dead",
                                       "param": None, "code": None}}, status_code=503)

    async def metrics_endpoint(self, request: Request):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def playground(self, request: Request):
        """The chat page (server/static/playground.html): it calls the API like any client."""
        return HTMLResponse(_PLAYGROUND.read_text(encoding="utf-8"))

    async def openapi(self, request: Request):
        from .openapi import openapi_document

        return JSONResponse(openapi_document(self.settings.served_model_name))

    async def version(self, request: Request):
        return JSONResponse({"version": VERSION})

    # ---- Triton generate extension -----------------------------------------------------
    def triton_request(self, request: Request, body: dict):
        lora = self.check_model(request.path_params["model"])
        text = P.field(body, "text_input", "str")
        if text is None:
            raise P.bad_field("text_input", "'text_input' is required.")
        fields = {**P.field(body, "parameters", "dict", {}), **body}
        if "stop_words" in fields and "stop" not in fields:  # TensorRT-LLM spelling
            fields["stop"] = fields["stop_words"] or None
        params = P.sampling_params(fields, P.field(fields, "max_tokens", "int", 64), None)
        if params.n != 1:
            raise P.bad_field("n", "the generate extension returns one text_output: n must be 1.")
        return text, params, lora

    @_guarded
    async def triton_generate(self, request: Request):
        text, params, lora = self.triton_request(request, await self.read_json(request))
        streams = await self.start_streams(P.new_id("trt"), [text], params, "text_input", lora)
        timer = self.metrics.timer("generate", None if lora is None else lora.lora_name)
        finals = await self.run_to_end(request, streams, timer)
        out = finals[0].outputs[0]
        timer.finish("ok", len(finals[0].prompt_token_ids), len(out.token_ids))
        return JSONResponse({"model_name": self.model_name(lora), "model_version": "1",
                             "text_output": out.text})

    @_guarded
    async def triton_generate_stream(self, request: Request):
        text, params, lora = self.triton_request(request, await self.read_json(request))
        streams = await self.start_streams(P.new_id("trt"), [text], params, "text_input", lora)
        name = self.model_name(lora)

        async def events():
            state = ChoiceState()
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    async for _, out in merge(streams):
                        delta, _ = state.advance(out.outputs[0])
                        if delta or out.finished:
                            yield {"data": json.dumps({"model_name": name, "model_version": "1",
                                                       "text_output": delta})}
            except TimeoutError:
                yield {"data": json.dumps({"error": "request exceeded its deadline and was "
                                                    "aborted"})}
            except Exception as e:  # noqa: BLE001 - Triton's error event, never a cut stream
                yield {"data": json.dumps({"error": _stream_error(e).message})}
            finally:
                streams[0].close()
        return EventSourceResponse(events(), ping=15)


def _stream_error(e: Exception) -> P.APIError:
    """The error event that ends a stream after its headers went out."""
    if isinstance(e, EngineDeadError):
        return P.APIError(503, str(e), "engine_dead")
    if isinstance(e, ValueError):
        return P.APIError(400, str(e))
    if isinstance(e, RequestFailedError):
        return P.APIError(500, str(e), "internal_error")
    logger.exception("internal error in a stream", exc_info=e)
    return P.APIError(500, "internal server error", "internal_error")
