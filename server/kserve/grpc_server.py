"""KServe v2 over gRPC (``inference.GRPCInferenceService``), served with grpc.aio on the
server's event loop from the stubs that ``tritonclient[grpc]`` ships: no protos of our own.

``ModelInfer`` is unary and works for the LLM (Triton refuses it for decoupled models).
``ModelStreamInfer`` is decoupled: each request on the stream gets one response per new
piece of text (``stream`` true) or one at the end, each echoing the request's ``id``; the
last carries ``triton_final_response`` true, or is an empty response of its own when the
request set ``triton_enable_empty_final_response``. Several requests run at once on one
stream. A cancelled call or stream aborts its requests, which frees their KV blocks."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from . import contract, tensors
from .errors import V2Error
from ..registry.admin import load_request
from .http import EXTENSIONS
from .service import InferService, engine_errors

logger = logging.getLogger("kvserve.kserve")
STREAM_QUEUE = 64  # responses buffered per stream; a slow reader coalesces engine outputs


class GRPCInferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferService, api_key: str | None, server_version: str,
                 admin_key: str | None = None) -> None:
        self.service = service
        self.api_key = api_key
        self.admin_key = admin_key
        self.server_version = server_version

    # ---- plumbing ----------------------------------------------------------------------
    def _check_auth(self, context) -> None:
        if self.api_key is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else given
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise V2Error("unauthenticated", "invalid or missing API key (send metadata "
                                             "'authorization: Bearer <key>')")

    def _check_admin(self, context) -> None:
        """The registry's load and unload take the admin key, never the API key."""
        if self.admin_key is None:
            raise V2Error("unauthenticated", "the admin API is off: start the server with "
                                             "--admin-key")
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else given
        if not hmac.compare_digest(token.encode(), self.admin_key.encode()):
            raise V2Error("unauthenticated", "invalid or missing admin key (send metadata "
                                             "'authorization: Bearer <admin key>')")

    async def _call(self, context, fn, *, auth: bool = True):
        try:
            with engine_errors():
                if auth:
                    self._check_auth(context)
                return await fn()
        except V2Error as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:  # noqa: BLE001 - our bug: report it, keep serving
            logger.exception("internal error in a gRPC call")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    # ---- health and metadata -----------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):
        async def run():
            try:
                v = self.service.check_model(request.name, request.version)
            except V2Error:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=v.state == "READY"
                                         and v.gateway.engine.is_running)
        return await self._call(context, run)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kvserve", version=self.server_version,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        async def run():
            v = self.service.check_model(request.name, request.version)
            meta = contract.model_metadata(v.model, self.service.registry.versions_of(v.model))
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])
        return await self._call(context, run)

    async def ModelConfig(self, request, context):
        async def run():
            v = self.service.check_model(request.name, request.version)
            config = contract.model_config(v.model, v.max_model_len)
            return pb.ModelConfigResponse(
                config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))
        return await self._call(context, run)

    async def ModelStatistics(self, request, context):
        async def run():
            stats = self.service.statistics(request.name, request.version)
            return json_format.ParseDict({"model_stats": stats},
                                         pb.ModelStatisticsResponse())
        return await self._call(context, run)

    async def RepositoryIndex(self, request, context):
        async def run():
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
                name=e["name"], version=e["version"], state=e["state"], reason=e["reason"])
                for e in self.service.registry.index(ready_only=request.ready)])
        return await self._call(context, run)

    async def RepositoryModelLoad(self, request, context):
        async def run():
            self._check_admin(context)
            registry = self.service.registry
            params = {k: _param_value(v) for k, v in request.parameters.items()}
            version, spec, weight, defaults = load_request(registry, request.model_name, params)
            await registry.load(request.model_name, version, spec, weight, defaults)
            return pb.RepositoryModelLoadResponse()
        return await self._call(context, run, auth=False)

    async def RepositoryModelUnload(self, request, context):
        async def run():
            self._check_admin(context)
            version = request.parameters["version"].string_param \
                if "version" in request.parameters else None
            await self.service.registry.unload(request.model_name, version or None)
            return pb.RepositoryModelUnloadResponse()
        return await self._call(context, run, auth=False)

    # ---- inference ---------------------------------------------------------------------
    def _job(self, request, stream_rpc: bool, context) -> contract.InferJob:
        self.service.check_model(request.model_name, request.model_version)
        inputs = tensors.inputs_from_grpc(request)
        requested = [o.name for o in request.outputs] or None
        job = contract.parse_job(inputs, tensors.grpc_params(request.parameters), requested,
                                 stream_rpc)
        job.id = request.id
        job.model, job.version = request.model_name, request.model_version
        job.route_key = dict(context.invocation_metadata() or ()).get("x-user-id")
        return job

    def _response(self, job, outputs, final: bool | None = None) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=job.served.model,
                                     model_version=job.served.version, id=job.id)
        for t in outputs:
            resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            resp.raw_output_contents.append(tensors.to_raw(t))
        if final is not None:
            tensors.set_grpc_param(resp.parameters, "triton_final_response", final)
        return resp

    async def ModelInfer(self, request, context):
        async def run():
            job = self._job(request, stream_rpc=False, context=context)
            return self._response(job, await self.service.unary(job, "kserve-grpc"))
        return await self._call(context, run)

    async def ModelStreamInfer(self, request_iterator, context):
        """Reads requests while answering earlier ones: each request runs as its own task
        and puts its responses on one queue, which this call writes out in arrival order."""
        try:
            self._check_auth(context)
        except V2Error as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)
        queue: asyncio.Queue = asyncio.Queue(STREAM_QUEUE)
        tasks: set[asyncio.Task] = set()
        done = object()

        async def read():
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._stream_one(request, queue, context))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:  # the client half-closed: finish what it sent
                    await asyncio.wait(set(tasks))
            finally:
                await queue.put(done)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await queue.get()) is not done:
                yield item
            reader.result()  # re-raise a failed read (the call then ends with its error)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _stream_one(self, request, queue: asyncio.Queue, context) -> None:
        job = None
        try:
            with engine_errors():
                job = self._job(request, stream_rpc=True, context=context)
                empty_final = bool(tensors.grpc_params(request.parameters).get(
                    "triton_enable_empty_final_response", False))
                responses = self.service.responses(job, "kserve-grpc")
                async with contextlib.aclosing(responses):
                    async for outputs, last in responses:
                        final = last and not empty_final
                        await queue.put(pb.ModelStreamInferResponse(
                            infer_response=self._response(job, outputs, final)))
                if empty_final:
                    await queue.put(pb.ModelStreamInferResponse(
                        infer_response=self._response(job, [], True)))
        except V2Error as e:
            await queue.put(_stream_error(request, e.message))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - our bug: this request fails, the stream goes on
            logger.exception("internal error in a gRPC stream request")
            await queue.put(_stream_error(request, "internal server error"))


def _param_value(p):
    """A ModelRepositoryParameter's value (bool, int, string or bytes)."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _stream_error(request, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id))


class _Undecodable:
    """What a request that is not a valid protobuf message deserializes to: the method then
    answers INVALID_ARGUMENT (grpc's own deserializer failure is an opaque UNKNOWN)."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message = f"the request is not a valid {message_type} message ({error})"


def _lenient(message_class):
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and friends: the client's bytes
            return _Undecodable(message_class.DESCRIPTOR.full_name, e)
    return deserialize


def _unary(fn):
    async def call(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await fn(request, context)
    return call


def _bidi(fn):
    async def call(requests, context):
        async def checked():
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                yield request
        async with contextlib.aclosing(fn(checked(), context)) as responses:
            async for response in responses:
                yield response
    return call


def _unimplemented(name: str):
    async def call(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by kvserve")
    return call


def _handlers(servicer: GRPCInferenceService) -> grpc.GenericRpcHandler:
    """The service's methods as the generated ``add_..._to_server`` registers them, but with
    request bytes that do not decode answered INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        fn = getattr(servicer, method.name)
        if not inspect.iscoroutinefunction(fn) and not inspect.isasyncgenfunction(fn):
            fn = _unimplemented(method.name)  # the generated base's sync placeholder
        request = _lenient(getattr(pb, method.input_type.name))
        response = getattr(pb, method.output_type.name).SerializeToString
        if method.client_streaming:  # ModelStreamInfer, the one stream (both ways)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _bidi(fn), request_deserializer=request, response_serializer=response)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn), request_deserializer=request, response_serializer=response)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def start_grpc_server(service: InferService, host: str, port: int, api_key: str | None,
                            server_version: str, max_message_bytes: int,
                            admin_key: str | None = None) -> grpc.aio.Server:
    """Bind and start on the running event loop; raises if the port cannot be bound."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
    ])
    server.add_generic_rpc_handlers((_handlers(
        GRPCInferenceService(service, api_key, server_version, admin_key)),))
    address = f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC: cannot listen on {address}")
    await server.start()
    logger.info("gRPC (KServe v2) listening on %s", address)
    return server
