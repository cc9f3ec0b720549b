"""A router in front of kvserve replicas (`kvserve router --backend URL ...`, or the one
`kvserve serve --data-parallel-size N` starts): every HTTP route is proxied as it comes,
responses (SSE streams included) are passed through chunk by chunk, never buffered.

Generate requests go to a replica by prefix affinity (server/router/policy.py); others to
the least-loaded replica. A health loop reads each replica's /health and /metrics (queue
depth) every ``health_interval`` seconds and drops a replica that stops answering. A request
whose connection to a replica failed before any response started is retried on another
replica; once a response has started, it is the client's. /health here is 200 while any
replica is healthy (the body says "degraded" when some are not), 503 when none is."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..http_body import read_body
from .. import protocol as P
from .policy import AffinityPolicy, Replica, request_hashes

logger = logging.getLogger("kvserve.router")

# hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx / uvicorn set themselves
DROP_REQUEST = {"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                 "proxy-connection", "content-length"}
DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                  "proxy-connection", "content-length", "date", "server"}
_METRICS = ("kvserve_num_requests_waiting", "kvserve_num_requests_running")


class Router:
    def __init__(self, backends: list[str], health_interval: float = 1.0,
                 max_imbalance: int = 8, max_body_bytes: int = 8 << 20,
                 body_read_timeout: float = 30.0) -> None:
        if not backends:
            raise ValueError("the router needs at least one --backend URL")
        self.policy = AffinityPolicy([Replica(u.rstrip("/")) for u in backends], max_imbalance)
        self.health_interval = health_interval
        self.max_body_bytes, self.body_read_timeout = max_body_bytes, body_read_timeout
        self.client: httpx.AsyncClient | None = None

    @property
    def replicas(self) -> list[Replica]:
        return self.policy.replicas

    # ---- health -------------------------------------------------------------------------
    async def check(self, r: Replica) -> None:
        try:
            health = await self.client.get(r.url + "/health", timeout=2.0)
            metrics = await self.client.get(r.url + "/metrics", timeout=2.0)
        except httpx.HTTPError:
            r.healthy = False
            return
        r.healthy = health.status_code == 200
        r.queue = int(sum(_metric(metrics.text, name) for name in _METRICS))

    async def health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(r) for r in self.replicas))
            await asyncio.sleep(self.health_interval)

    async def health(self, request: Request):
        healthy = [r for r in self.replicas if r.healthy]
        body = {"status": "ok" if len(healthy) == len(self.replicas) else
                "degraded" if healthy else "unavailable",
                "replicas": [{"url": r.url, "healthy": r.healthy, "queue": r.queue,
                              "in_flight": r.in_flight, "served": r.served,
                              "prefix_hits": r.prefix_hits} for r in self.replicas]}
        return JSONResponse(body, status_code=200 if healthy else 503)

    # ---- proxying -----------------------------------------------------------------------
    async def proxy(self, request: Request):
        try:
            body = await read_body(request, self.max_body_bytes, self.body_read_timeout)
        except P.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        hashes = request_hashes(request.url.path, body) if request.method == "POST" else []
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP_REQUEST]
        tried: set[str] = set()
        while True:
            replica = self.policy.choose(hashes, tried)
            if replica is None:
                return JSONResponse(P.APIError(503, "no healthy replica", "unavailable").body(),
                                    status_code=503, headers={"Retry-After": "1"})
            upstream = self.client.build_request(request.method, replica.url + path,
                                                 headers=headers, content=body)
            replica.in_flight += 1
            try:
                response = await self.client.send(upstream, stream=True)
            except httpx.TransportError as e:
                # no response started (refused, reset, a pooled connection to a dead
                # replica): mark it down and try another replica
                replica.in_flight -= 1
                replica.healthy = False
                tried.add(replica.url)
                logger.warning("replica %s failed before responding (%s); retrying", replica.url, e)
                continue
            except BaseException:
                replica.in_flight -= 1
                raise
            return StreamingResponse(
                _passthrough(response, replica), status_code=response.status_code,
                headers={k: v for k, v in response.headers.items()
                         if k.lower() not in DROP_RESPONSE})


async def _passthrough(response: httpx.Response, replica: Replica):
    """The replica's bytes as they come; closing early (the client left) closes upstream,
    which aborts the request on the replica."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        replica.in_flight -= 1
        await response.aclose()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def build_router(backends: list[str], grpc_backends: list[str] | None = None,
                 grpc_host: str = "127.0.0.1", grpc_port: int = 0, **kwargs) -> Starlette:
    """The router app; with ``grpc_port`` it also proxies KServe v2 gRPC on that port to
    ``grpc_backends`` (each replica's gRPC host:port, in the order of ``backends``)."""
    router = Router(backends, **kwargs)
    if grpc_port and len(grpc_backends or ()) != len(backends):
        raise ValueError("gRPC through the router needs one gRPC address per backend")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        router.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                          limits=httpx.Limits(max_connections=None))
        await asyncio.gather(*(router.check(r) for r in router.replicas))
        task = asyncio.get_running_loop().create_task(router.health_loop())
        grpc_server = proxy = None
        try:
            if grpc_port:
                from .grpc_proxy import start_grpc_proxy

                targets = {r.url: g for r, g in zip(router.replicas, grpc_backends)}
                grpc_server, proxy = await start_grpc_proxy(router, targets, grpc_host,
                                                            grpc_port)
            yield
        finally:
            task.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
                await proxy.close()
            await router.client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(routes=[Route("/health", router.health, methods=["GET"]),
                            Route("/{path:path}", router.proxy, methods=methods)],
                    lifespan=lifespan)
    app.state.router = router
    return app
