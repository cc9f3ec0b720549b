"""kvserve on Ray Serve: replicas of the whole kvserve server as a Serve deployment, behind
Serve's HTTP proxy, autoscaled by Serve, each request sent to a replica by prefix-cache
affinity (the policy of ``kvserve router``: server/router/policy.py).

    serve run server.ray_serve:build_app model=/path/to/model min_replicas=1 max_replicas=4

Two deployments:

- ``KVServeReplica``: one engine and the kvserve Starlette app (every route: OpenAI, KServe
  v2 HTTP, metrics) in each replica process. A request reaches it as (method, path, query,
  headers, body) and is answered by the app in-process; the ASGI messages stream back
  through a Serve streaming handle, so SSE tokens are not buffered, and a client that goes
  away cancels the stream, which the app sees as a disconnect (the request is aborted).
- ``Ingress``: Serve's HTTP entry. It reads the body (bounded like the server's own) and
  calls the replicas through a handle. It exists because the Serve proxy never parses a
  body: the replica router can only see the prompt on this second hop.

``PrefixAffinityRouter`` is a Ray Serve ``RequestRouter``: it ranks the replica holding the
longest run of the request's prefix-block hashes first (unless its queue, from Serve's own
queue-length cache, is deeper than the least-loaded one's by more than ``max_imbalance``),
then the others, and remembers where each request was actually sent.

Scaling is Serve's: ``num_replicas=N`` fixes the count, otherwise ``autoscaling_config``
(min_replicas, max_replicas, target_ongoing_requests) moves it with the load.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .router.app import DROP_REQUEST, DROP_RESPONSE  # the router's hop-by-hop lists
from .router.policy import AffinityPolicy, Replica, request_hashes

logger = logging.getLogger("kvserve.ray_serve")

# build_app's own keys; every other key is a `kvserve serve` setting
_SERVE_KEYS = {"num_replicas": int, "min_replicas": int, "max_replicas": int,
               "target_ongoing_requests": float, "max_ongoing_requests": int,
               "num_cpus": float, "num_gpus": float, "max_imbalance": int}


# ---- the replica ---------------------------------------------------------------------------
class KVServeReplica:
    """One engine and the kvserve app, answering requests handed over by ``Ingress``."""

    async def __init__(self, argv: list[str]) -> None:
        import dataclasses

        from engine.async_engine import AsyncLLMEngine
        from engine.core.config import EngineConfig

        from .app import build_app
        from .cli import _default_name, load_settings, lora_modules, server_settings

        engine_kwargs, srv = load_settings(argv)
        loras = lora_modules(srv.get("lora_modules"))
        if loras:
            engine_kwargs["enable_lora"] = True
        self.engine = AsyncLLMEngine.from_config(EngineConfig(**engine_kwargs),
                                                 srv.get("max_waiting_requests"))
        name = srv.get("served_model_name") or _default_name(engine_kwargs.get("model"))
        # Serve's health check replaces a dead replica; Serve's proxy is the only front door
        settings = dataclasses.replace(server_settings(srv, name, loras),
                                       exit_on_engine_death_after=None, grpc_port=None)
        self.app = build_app(self.engine, settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()

    async def check_health(self) -> None:
        """Serve's health probe: a replica whose engine loop died is restarted."""
        if self.engine.dead_error is not None:
            raise RuntimeError(f"the engine loop died: {self.engine.dead_error}")

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self._lifespan.__aexit__(None, None, None)
        with contextlib.suppress(Exception):
            self.engine.engine.close()

    async def handle(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                     body: bytes):
        """The app's answer as a stream: {"status", "headers"} first (with this replica's id
        in ``x-kvserve-replica``), then body chunks."""
        replica = serve.get_replica_context().replica_id.unique_id
        async for message in asgi_call(self.app, method, path, query, headers, body):
            if isinstance(message, dict):
                message["headers"].append(("x-kvserve-replica", replica))
            yield message


async def asgi_call(app, method: str, path: str, query: str, headers: list[tuple[str, str]],
                    body: bytes):
    """Run one HTTP request through an ASGI app in this process: yields {"status",
    "headers"} once, then the body chunks as the app sends them. Closing the generator (the
    caller went away) reads to the app as the client disconnecting."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": query.encode(), "client": ("127.0.0.1", 0),
             "server": ("kvserve", 80),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                         for k, v in headers]}
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    started = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1"))
                                   for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        if not started:  # the app failed before answering: the answer it would have sent
            yield {"status": 500, "headers": [("content-type", "application/json")]}
            yield (b'{"error": {"message": "internal server error", '
                   b'"type": "internal_server_error", "code": 500}}')
    finally:
        gone.set()
        # Starlette re-raises a handler's error after its 500 went out: logged, not raised
        # into a response that is already complete
        try:
            await asyncio.wait_for(task, 5.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001
            logger.exception("request %s %s failed in the app", method, path)


# ---- the HTTP entry -------------------------------------------------------------------------
class Ingress:
    def __init__(self, replicas, max_body_bytes: int, body_read_timeout: float) -> None:
        self.replicas = replicas.options(stream=True)
        self.max_body_bytes, self.body_read_timeout = max_body_bytes, body_read_timeout

    async def __call__(self, request: Request):
        from . import protocol as P
        from .app import error_response
        from .http_body import read_body

        try:
            body = await read_body(request, self.max_body_bytes, self.body_read_timeout)
        except P.APIError as e:  # too large / too slow: the server's own answer
            return error_response(e)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP_REQUEST]
        stream = self.replicas.handle.remote(request.method, request.url.path,
                                             request.url.query, headers, body)
        start = await stream.__anext__()

        async def chunks():
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                stream.cancel()  # the client went away: the replica's app sees a disconnect

        out_headers = {k: v for k, v in start["headers"] if k.lower() not in DROP_RESPONSE}
        return StreamingResponse(chunks(), status_code=start["status"], headers=out_headers)


# ---- routing --------------------------------------------------------------------------------
class PrefixAffinityRouter(RequestRouter):
    """Serve's replica choice by prefix-cache affinity against queue depth."""

    def initialize_state(self, max_imbalance: int = 8, **kwargs) -> None:
        self.policy = AffinityPolicy([], max_imbalance=max_imbalance)
        self.by_id: dict[str, Replica] = {}
        self.hashes: dict[str, list[bytes]] = {}  # internal request id -> its prefix hashes
        self.hits: dict[str, bool] = {}

    def _replica(self, running: RunningReplica) -> Replica:
        key = running.replica_id.unique_id
        if key not in self.by_id:
            self.by_id[key] = Replica(key)
        return self.by_id[key]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hashes = _pending_hashes(pending_request)
        pool = []
        for running in candidate_replicas:
            replica = self._replica(running)
            queue = self._replica_queue_len_cache.get(running.replica_id)
            replica.queue = queue or 0
            pool.append(replica)
        self.policy.replicas = pool
        picked = self.policy.pick(hashes)
        first = next(r for r in candidate_replicas
                     if r.replica_id.unique_id == picked[0].url)
        if pending_request is not None:
            request_id = pending_request.metadata.internal_request_id
            self.hashes[request_id], self.hits[request_id] = hashes, picked[1]
        return [[first], [r for r in candidate_replicas if r is not first]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        request_id = pending_request.metadata.internal_request_id
        hashes = self.hashes.pop(request_id, [])
        hit = self.hits.pop(request_id, False)
        replica = self.by_id.get(replica_id.unique_id)
        if replica is not None:
            self.policy.record(replica, hit, hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for key in list(self.by_id):
            if key not in live:
                del self.by_id[key]  # its cached prefixes went with it


def _pending_hashes(pending_request: PendingRequest | None) -> list[bytes]:
    args = pending_request.args if pending_request is not None else ()
    if len(args) >= 5 and args[0] == "POST" and isinstance(args[4], bytes):
        return request_hashes(args[1], args[4])
    return []


# ---- the application ------------------------------------------------------------------------
def build_app(args: dict[str, Any]):
    """The Serve application: ``serve run server.ray_serve:build_app key=value ...``. Keys
    are ``kvserve serve``'s settings (``model``, ``max_num_seqs``, ``api_key``, ...; a key
    with value "true" is a flag) plus num_replicas, or min_replicas / max_replicas /
    target_ongoing_requests (autoscaling, the default: 1..2), max_ongoing_requests,
    num_cpus / num_gpus per replica and max_imbalance (the router's)."""
    from .cli import load_settings

    opts, argv = _split_args(args)
    try:
        _, srv = load_settings(argv)  # checked here, before any replica starts
    except SystemExit as e:  # argparse's way of refusing a value: said on stderr
        raise ValueError(f"bad kvserve settings for the Serve app: {argv}") from e
    for key, why in (("models", "a registry config ([models] tables)"),
                     ("data_parallel_size", "data_parallel_size (Serve's replicas are that)")):
        if srv.get(key) not in (None, 1):
            raise ValueError(f"the Serve app runs one model per replica: {why} is not "
                             "supported here")
    if "num_replicas" in opts:
        scaling: dict = {"num_replicas": opts["num_replicas"]}
    else:
        scaling = {"autoscaling_config": {
            "min_replicas": opts.get("min_replicas", 1),
            "max_replicas": opts.get("max_replicas", 2),
            "target_ongoing_requests": opts.get("target_ongoing_requests", 16.0)}}
    actor = {"num_cpus": opts.get("num_cpus", 1.0)}
    if opts.get("num_gpus"):
        actor["num_gpus"] = opts["num_gpus"]
    router = RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                 request_router_kwargs={
                                     "max_imbalance": opts.get("max_imbalance", 8)})
    replicas = serve.deployment(KVServeReplica).options(
        name="KVServeReplica", max_ongoing_requests=opts.get("max_ongoing_requests", 256),
        ray_actor_options=actor, request_router_config=router,
        health_check_period_s=5, **scaling).bind(argv)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", max_ongoing_requests=opts.get("max_ongoing_requests", 256) * 4,
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(replicas, srv.get("max_body_bytes", 8 << 20),
                        srv.get("body_read_timeout", 30.0))


def _split_args(args: dict[str, Any]) -> tuple[dict, list[str]]:
    """(build_app's own options, typed; argv for `kvserve serve`'s parser, which checks
    and types the rest)."""
    from .cli import serve_parser

    flags = {a.dest: a for a in serve_parser()._actions}
    opts, argv = {}, []
    for key, value in args.items():
        key = key.replace("-", "_")
        if key in _SERVE_KEYS:
            opts[key] = _SERVE_KEYS[key](value)
            continue
        action = flags.get(key)
        if action is None:
            raise ValueError(f"unknown kvserve setting {key!r}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true / store_false: the flag when it changes the value
            if (str(value).lower() in ("1", "true", "yes")) == bool(action.const):
                argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return opts, argv
