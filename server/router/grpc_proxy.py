"""KServe v2 gRPC through the router: every ``inference.GRPCInferenceService`` call is
forwarded to a replica's gRPC listener as raw bytes (no re-encoding), the caller's metadata
(API key, routing key) with it, and the replica's status code and details back unchanged.

Replicas are chosen by the same policy as HTTP requests: ``ModelInfer`` and the first
message of a ``ModelStreamInfer`` stream by the prefix hashes of their ``text_input``,
every other call by load. A unary call the replica could not take (UNAVAILABLE: refused,
or gone) is retried on another replica; a stream belongs to its replica once opened.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

import grpc

from .policy import Replica, prefix_hashes

logger = logging.getLogger("kvserve.router")

SERVICE = "/inference.GRPCInferenceService/"
_STREAMING = {SERVICE + "ModelStreamInfer"}
_INFER = {SERVICE + "ModelInfer", SERVICE + "ModelStreamInfer"}
_DROP_METADATA = {"user-agent", "content-type", "te", "grpc-accept-encoding",
                  "grpc-encoding", "grpc-timeout"}


class GrpcProxy(grpc.GenericRpcHandler):
    def __init__(self, router, targets: dict[str, str], max_message_bytes: int) -> None:
        """``targets``: replica URL (as the router knows it) -> its gRPC host:port."""
        self.router = router
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.channels = {url: grpc.aio.insecure_channel(target, options=options)
                         for url, target in targets.items()}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels.values()))

    def service(self, details: grpc.HandlerCallDetails):
        if not details.method.startswith(SERVICE):
            return None  # UNIMPLEMENTED, as the replicas would say
        if details.method in _STREAMING:
            return grpc.stream_stream_rpc_method_handler(
                functools.partial(self._stream, details.method))
        return grpc.unary_unary_rpc_method_handler(
            functools.partial(self._unary, details.method))

    def _choose(self, hashes: list[bytes], tried: set[str]) -> Replica | None:
        pool = [r for r in self.router.replicas if r.url in self.channels]
        candidates = {r.url for r in pool} - tried
        if not candidates:
            return None
        return self.router.policy.choose(hashes, {r.url for r in self.router.replicas}
                                         - candidates)

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext):
        hashes = _hashes(method, request)
        metadata = _metadata(context)
        tried: set[str] = set()
        while True:
            replica = self._choose(hashes, tried)
            if replica is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy replica")
            call = self.channels[replica.url].unary_unary(method)
            replica.in_flight += 1
            try:
                return await call(request, metadata=metadata, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    replica.healthy = False  # the health loop brings it back if it answers
                    tried.add(replica.url)
                    logger.warning("replica %s unavailable over gRPC (%s); retrying",
                                   replica.url, e.details())
                    continue
                await context.abort(e.code(), e.details() or "")
            finally:
                replica.in_flight -= 1

    async def _stream(self, method: str, requests, context: grpc.aio.ServicerContext):
        requests = requests.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        replica = self._choose(_hashes(method, first), set())
        if replica is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy replica")
        call = self.channels[replica.url].stream_stream(method)(metadata=_metadata(context))

        async def pump():
            await call.write(first)
            async for message in requests:
                await call.write(message)
            await call.done_writing()

        writer = asyncio.ensure_future(pump())
        replica.in_flight += 1
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")
        finally:
            replica.in_flight -= 1
            writer.cancel()
            call.cancel()  # the client went away: the replica's stream (and requests) end
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer


def _metadata(context: grpc.aio.ServicerContext) -> tuple:
    return tuple((k, v) for k, v in context.invocation_metadata() or ()
                 if not k.startswith(":") and k not in _DROP_METADATA)


def _hashes(method: str, request: bytes) -> list[bytes]:
    """Prefix hashes of an infer request's first text_input string; none for other calls."""
    if method not in _INFER:
        return []
    from tritonclient.grpc import service_pb2

    try:
        req = service_pb2.ModelInferRequest.FromString(request)
    except Exception:  # noqa: BLE001 - the replica will say what is wrong with it
        return []
    for i, tensor in enumerate(req.inputs):
        if tensor.name != "text_input":
            continue
        if tensor.contents.bytes_contents:
            text = tensor.contents.bytes_contents[0]
        elif i < len(req.raw_input_contents) and len(req.raw_input_contents[i]) >= 4:
            raw = req.raw_input_contents[i]  # BYTES in binary: 4-byte length, then the bytes
            text = raw[4:4 + int.from_bytes(raw[:4], "little")]
        else:
            return []
        return prefix_hashes(text.decode("utf-8", "replace"))
    return []


async def start_grpc_proxy(router, targets: dict[str, str], host: str, port: int,
                           max_message_bytes: int = 64 << 20):
    """(the started grpc.aio server, the proxy); raises if the port cannot be bound."""
    proxy = GrpcProxy(router, targets, max_message_bytes)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((proxy,))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"gRPC: cannot listen on {host}:{port}")
    await server.start()
    logger.info("gRPC proxy listening on %s:%d", host, port)
    return server, proxy
