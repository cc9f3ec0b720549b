"""KServe v2 over HTTP, on the same starlette app (and port) as the OpenAI API: server and
model metadata, health, model config, repository index, and ``infer`` with JSON data or
the binary tensor extension in both directions. Errors are ``{"error": "..."}``."""
from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..http_body import read_body, until_disconnect
from . import contract, tensors
from .errors import V2Error
from .service import InferService, engine_errors

logger = logging.getLogger("kvserve.kserve")

EXTENSIONS = ["binary_tensor_data", "parameters", "model_configuration", "generate",
              "model_repository"]


def v2_response(err: V2Error) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.http_status, headers=err.headers)


class KServeHTTP:
    def __init__(self, service: InferService, check_auth, server_version: str,
                 max_body_bytes: int, body_read_timeout: float) -> None:
        self.service = service
        self.check_auth = check_auth  # raises protocol.APIError(401)
        self.server_version = server_version
        self.max_body_bytes, self.body_read_timeout = max_body_bytes, body_read_timeout

    def routes(self) -> list[Route]:
        m, v = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        return [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2/models/stats", self.stats, methods=["GET"]),
            *(r for base in (m, v) for r in (
                Route(base, self.model_metadata, methods=["GET"]),
                Route(base + "/ready", self.model_ready, methods=["GET"]),
                Route(base + "/config", self.model_config, methods=["GET"]),
                Route(base + "/stats", self.stats, methods=["GET"]),
                Route(base + "/infer", self.infer, methods=["POST"]),
            )),
        ]

    async def _guard(self, request: Request, handler):
        try:
            with engine_errors():
                self.check_auth(request)
                return await handler()
        except V2Error as e:
            return v2_response(e)
        except Exception:  # noqa: BLE001 - our bug: report it, keep serving
            logger.exception("internal error on %s", request.url.path)
            return v2_response(V2Error("internal", "internal server error"))

    def _model(self, request: Request):
        return self.service.check_model(request.path_params["model"],
                                        request.path_params.get("version", ""))

    # ---- metadata and health ---------------------------------------------------------
    async def server_metadata(self, request: Request):
        return JSONResponse({"name": "kvserve", "version": self.server_version,
                             "extensions": EXTENSIONS})

    async def live(self, request: Request):
        return Response(status_code=200)

    async def ready(self, request: Request):
        if self.service.ready:
            return Response(status_code=200)
        return v2_response(V2Error("unavailable", "engine loop is not running"))

    async def model_metadata(self, request: Request):
        async def run():
            v = self._model(request)
            return JSONResponse(contract.model_metadata(
                v.model, self.service.registry.versions_of(v.model)))
        return await self._guard(request, run)

    async def model_ready(self, request: Request):
        async def run():
            v = self._model(request)
            if v.state != "READY" or not v.gateway.engine.is_running:
                raise V2Error("unavailable", f"{v.model} version {v.version} is {v.state}"
                              if v.state != "READY" else "engine loop is not running")
            return Response(status_code=200)
        return await self._guard(request, run)

    async def model_config(self, request: Request):
        async def run():
            v = self._model(request)
            return JSONResponse(contract.model_config(v.model, v.max_model_len))
        return await self._guard(request, run)

    async def stats(self, request: Request):
        async def run():
            return JSONResponse({"model_stats": self.service.statistics(
                request.path_params.get("model", ""), request.path_params.get("version", ""))})
        return await self._guard(request, run)

    # ---- infer -----------------------------------------------------------------------
    async def infer(self, request: Request):
        async def run():
            self._model(request)
            body = await read_body(request, self.max_body_bytes, self.body_read_timeout)
            header, binary = tensors.parse_http_body(
                body, request.headers.get("inference-header-content-length"))
            inputs = tensors.inputs_from_json(header, binary)
            params = _dict(header, "parameters")
            wanted = _requested(header)
            job = contract.parse_job(inputs, params, [w[0] for w in wanted] if wanted else None,
                                     stream_rpc=False)
            job.id = str(header.get("id", ""))[:256]
            job.model = request.path_params["model"]
            job.version = request.path_params.get("version", "")
            job.route_key = request.headers.get("x-user-id")
            as_binary = _binary_choice(params, wanted)
            outputs = await until_disconnect(request, self.service.unary(job, "kserve-http"))
            return self._respond(job, outputs, as_binary)
        return await self._guard(request, run)

    def _respond(self, job, outputs, as_binary) -> Response:
        entries, blobs = [], []
        for t in outputs:
            entry, raw = tensors.output_json(t, as_binary(t.name))
            entries.append(entry)
            if raw is not None:
                blobs.append(raw)
        served = job.served
        header = {"model_name": served.model, "model_version": served.version,
                  "outputs": entries}
        if job.id:
            header["id"] = job.id
        head = json.dumps(header).encode("utf-8")
        version = {"x-kvserve-model-version": served.version}
        if not blobs:
            return Response(head, media_type="application/json", headers=version)
        return Response(head + b"".join(blobs), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head)), **version})


def _dict(body: dict, key: str) -> dict:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise V2Error.bad(f"'{key}' must be an object")
    return value


def _requested(header: dict) -> list[tuple[str, bool | None]] | None:
    """(name, binary_data or None) for each entry of ``outputs``; None: no list given."""
    outputs = header.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise V2Error.bad("'outputs' must be a list of objects with a 'name'")
    wanted = []
    for o in outputs:
        binary = _dict(o, "parameters").get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise V2Error.bad(f"output '{o['name']:.100}': binary_data must be true or false")
        wanted.append((o["name"], binary))
    return wanted


def _binary_choice(params: dict, wanted):
    """Which outputs go out as binary data: a per-output ``binary_data`` wins, else the
    request's ``binary_data_output`` (tritonclient.http sets it when no outputs are named)."""
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise V2Error.bad("parameter 'binary_data_output' must be true or false")
    per_output = {name: b for name, b in (wanted or ()) if b is not None}
    return lambda name: per_output.get(name, default)
