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

from . import protocol as P
from .gateway import Gateway
from .http_body import read_body, until_disconnect
from .kserve.http import KServeHTTP
from .kserve.service import InferService
from .metrics import Metrics
from .registry.admin import RepositoryAdmin, model_cards
from .registry.config import VersionSpec
from .registry.registry import Registry, Target
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
    # The registry's admin API (/v2/repository/...: load, unload, traffic) takes this key
    # and no other; None: the admin API is off (the index stays readable with the API key).
    admin_key: str | None = None
    # An unloaded version's requests in flight get this long to finish, then are stopped.
    drain_timeout: float | None = 300.0


def build_app(async_engine: AsyncLLMEngine | None, settings: ServerSettings,
              registry_spec=None, make_engine=None) -> Starlette:
    """One model (``async_engine``, served as ``settings.served_model_name``), or a
    registry config (``registry_spec``, each full version built by ``make_engine(kwargs)``
    on a thread while the server starts)."""
    registry = Registry(make_engine, lambda e: _gateway(e, settings),
                        request_timeout=settings.request_timeout,
                        drain_timeout=settings.drain_timeout)
    metrics = registry.metrics = Metrics(registry.rows)
    if async_engine is not None:
        registry.adopt(settings.served_model_name, "1", async_engine)
        for name, path in (settings.lora_modules or {}).items():
            registry.adopt_lora(name, path, settings.served_model_name)
    api = _API(registry, settings, metrics)
    kserve = InferService(registry, metrics, request_timeout=settings.request_timeout)
    v2_http = KServeHTTP(kserve, api.check_auth, VERSION, settings.max_body_bytes,
                         settings.body_read_timeout)
    admin = RepositoryAdmin(registry, api, settings.admin_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if async_engine is not None:
            async_engine.start()
        else:
            try:
                await registry.start(registry_spec)
            except BaseException:
                await registry.close()  # the versions that did load
                raise
        registry.start_background()
        grpc_server = None
        try:
            if settings.grpc_port:
                from .kserve.grpc_server import start_grpc_server

                grpc_server = await start_grpc_server(
                    kserve, settings.grpc_host, settings.grpc_port, settings.api_key, VERSION,
                    settings.grpc_max_message_bytes, settings.admin_key)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)  # cancels open calls: their requests abort
            await registry.close()

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
        Route("/v2/models/{model}/versions/{version}/generate", api.triton_generate,
              methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/generate_stream",
              api.triton_generate_stream, methods=["POST"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/", api.playground, methods=["GET"]),
        *v2_http.routes(),
        *admin.routes(),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.registry = registry  # the models, versions and their engines
    return app


def _gateway(async_engine: AsyncLLMEngine, settings: ServerSettings) -> Gateway:
    """A loaded engine's gateway, with the server's chat template and tool-call parser."""
    gateway = Gateway(async_engine, settings.prepare_timeout)
    tokenizer = gateway.tokenizer
    if settings.chat_template is not None and tokenizer is not None:
        tokenizer.chat_template = settings.chat_template
    gateway.tool_parser = parser_for(settings.tool_call_parser,
                                     getattr(tokenizer, "chat_template", None))
    if settings.exit_on_engine_death_after is not None:  # any model's: a supervisor restarts
        async_engine.on_dead.append(lambda e: _exit_later(settings))
    return gateway


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
    def __init__(self, registry: Registry, settings: ServerSettings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics

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

    async def route(self, request: Request, body: dict, name=None, version=None) -> Target:
        """The model version a request runs on: ``model`` ("m" or "m:v"; the default model
        when absent) and, for the weighted split, the routing key: OpenAI's ``user``, else
        the x-user-id header, else none (a random point). No ``await`` may come between this
        and the target's start_streams (see server/registry/registry.py)."""
        if name is None:
            name = P.field(body, "model", "str")
        user = P.field(body, "user", "str")  # a wrong type is a 400, like OpenAI's
        key = user or request.headers.get("x-user-id")
        return await self.registry.route(name, version, key)

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
        req = P.parse_completion(body)
        t = await self.route(request, body)
        rid = P.new_id("cmpl")
        streams = await t.gateway.start_streams(rid, req.prompts, req.params, lora=t.lora)
        shaper = CompletionShaper(t.gateway.token_text, t.reported, rid,
                                  req.params, req.echo, req.prompt_logprobs, req.return_token_ids)
        return await self.respond(request, streams, shaper, req, t)

    @_guarded
    async def chat(self, request: Request):
        body = await self.read_json(request)
        t = await self.route(request, body)
        g = t.gateway
        req = P.parse_chat(body, g.tokenizer, self.settings.trust_request_chat_template,
                           g.engine.engine.max_prompt_chars, g.tool_parser)
        rid = P.new_id("chatcmpl")
        streams = await g.start_streams(rid, req.prompts, req.params, "messages", t.lora)
        shaper = ChatShaper(g.token_text, t.reported, rid, req.params,
                            req.params.logprobs or 0, req.tools)
        return await self.respond(request, streams, shaper, req, t)

    def timer(self, t: Target, protocol: str = "openai"):
        return self.metrics.timer(protocol, None if t.lora is None else t.lora.lora_name,
                                  (t.model, t.version))

    async def respond(self, request: Request, streams, shaper, req: P.ParsedRequest,
                      t: Target):
        timer = self.timer(t)
        headers = {"x-kvserve-model-version": t.version}
        if req.stream:
            return EventSourceResponse(self.sse(streams, shaper, timer, req.stream_options),
                                       ping=15, headers=headers)
        finals = await self.run_to_end(request, streams, timer)
        timer.finish("ok", *shaper.token_counts(finals))
        return JSONResponse(shaper.full_response(finals), headers=headers)

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
                timer.fail(outcome)

    @_guarded
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: a prompt, or chat messages through the template, to token ids."""
        body = await self.read_json(request)
        g = (await self.route(request, body)).gateway
        engine = g.engine.engine
        special = P.field(body, "add_special_tokens", "bool", True)
        if "messages" in body:
            req = P.parse_chat({**body, "max_tokens": 1}, g.tokenizer,
                               self.settings.trust_request_chat_template,
                               engine.max_prompt_chars, g.tool_parser)
            job = req.prompts[0]
        else:
            text = P.field(body, "prompt", "str")
            if text is None:
                raise P.bad_field("prompt", "'prompt' (a string) or 'messages' is required.")
            def job():
                engine.check_prompt_chars(len(text))
                return {"prompt_token_ids": g.tokenizer.encode(text,
                                                               add_special_tokens=special)}
        ids = (await g.run_prep(job))["prompt_token_ids"]
        return JSONResponse({"count": len(ids), "max_model_len": engine.max_model_len,
                             "tokens": ids})

    @_guarded
    async def detokenize(self, request: Request):
        body = await self.read_json(request)
        g = (await self.route(request, body)).gateway
        engine = g.engine.engine
        ids = P.field(body, "tokens", "int_list")
        if ids is None:
            raise P.bad_field("tokens", "'tokens' (a list of token ids) is required.")
        vocab = engine.model_config.vocab_size
        if len(ids) > engine.max_model_len or any(not 0 <= t < vocab for t in ids):
            raise P.bad_field("tokens", f"'tokens' must be at most max_model_len ids in "
                                        f"[0, {vocab}).")
        text = await g.run_prep(lambda: g.tokenizer.decode(ids))
        return JSONResponse({"prompt": text})

    async def models(self, request: Request):
        """Every routable model: by name (routed by weight) and, for registry models, each
        version as "name:version"; adapters name their base as ``parent``."""
        try:
            self.check_auth(request)
        except P.APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": model_cards(self.registry)})

    # ---- LoRA adapters at run time (vLLM's shapes) ---------------------------------------
    def _check_runtime_lora(self) -> None:
        if not self.settings.allow_runtime_lora_updates:
            raise P.APIError(404, "loading adapters at run time is off (start the server with "
                                  "--allow-runtime-lora-updates).", code="not_found")

    @_guarded
    async def load_lora_adapter(self, request: Request):
        """An adapter of the default model, served as a model of its own name."""
        self._check_runtime_lora()
        body = await self.read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise P.APIError(400, "lora_name and lora_path must be non-empty strings.")
        base = self.registry.default_model
        try:
            await self.registry.load(name, "1", VersionSpec(lora=path, base=f"{base}:1"),
                                     show_version=False)
        except P.APIError as e:  # vLLM answers 400 for a name already in use, too
            raise P.APIError(400, e.message, param="lora_name") from None
        return Response(f"Success: LoRA adapter '{name}' added successfully.",
                        media_type="text/plain")

    @_guarded
    async def unload_lora_adapter(self, request: Request):
        self._check_runtime_lora()
        body = await self.read_json(request)
        name = body.get("lora_name")
        model = self.registry.models.get(name) if isinstance(name, str) else None
        if model is None or not any(v.routable and v.spec.is_lora
                                    for v in model.versions.values()):
            raise P.APIError(404, f"no LoRA adapter named {name!r:.200}.", param="lora_name",
                             code="model_not_found")
        await self.registry.unload(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.",
                        media_type="text/plain")

    async def health(self, request: Request):
        if self.registry.ready:
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

        return JSONResponse(openapi_document(self.registry.default_model))

    async def version(self, request: Request):
        return JSONResponse({"version": VERSION})

    # ---- Triton generate extension -----------------------------------------------------
    async def triton_request(self, request: Request, body: dict):
        text = P.field(body, "text_input", "str")
        if text is None:
            raise P.bad_field("text_input", "'text_input' is required.")
        fields = {**P.field(body, "parameters", "dict", {}), **body}
        if "stop_words" in fields and "stop" not in fields:  # TensorRT-LLM spelling
            fields["stop"] = fields["stop_words"] or None
        params = P.sampling_params(fields, P.field(fields, "max_tokens", "int", 64), None)
        if params.n != 1:
            raise P.bad_field("n", "the generate extension returns one text_output: n must be 1.")
        t = await self.route(request, body, request.path_params["model"],
                             request.path_params.get("version"))
        streams = await t.gateway.start_streams(P.new_id("trt"), [text], params, "text_input",
                                                t.lora)
        return t, streams

    @_guarded
    async def triton_generate(self, request: Request):
        t, streams = await self.triton_request(request, await self.read_json(request))
        timer = self.timer(t, "generate")
        finals = await self.run_to_end(request, streams, timer)
        out = finals[0].outputs[0]
        timer.finish("ok", len(finals[0].prompt_token_ids), len(out.token_ids))
        return JSONResponse({"model_name": t.model, "model_version": t.version,
                             "text_output": out.text},
                            headers={"x-kvserve-model-version": t.version})

    @_guarded
    async def triton_generate_stream(self, request: Request):
        t, streams = await self.triton_request(request, await self.read_json(request))
        name, version = t.model, t.version

        async def events():
            state = ChoiceState()
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    async for _, out in merge(streams):
                        delta, _ = state.advance(out.outputs[0])
                        if delta or out.finished:
                            yield {"data": json.dumps({"model_name": name,
                                                       "model_version": version,
                                                       "text_output": delta})}
            except TimeoutError:
                yield {"data": json.dumps({"error": "request exceeded its deadline and was "
                                                    "aborted"})}
            except Exception as e:  # noqa: BLE001 - Triton's error event, never a cut stream
                yield {"data": json.dumps({"error": _stream_error(e).message})}
            finally:
                streams[0].close()
        return EventSourceResponse(events(), ping=15,
                                   headers={"x-kvserve-model-version": version})


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
