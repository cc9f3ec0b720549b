"""The registry's admin API over HTTP: Triton's model repository extension plus traffic.

    POST /v2/repository/index                      [{"name", "version", "state", "reason",
                                                     "kind", "traffic_percent", ...}]
    POST /v2/repository/models/{m}/load            {"parameters": {"version": "2",
                                                     "path": "..." | "lora": "...", "base": "1",
                                                     "weight": 0, "config": "{engine json}"}}
    POST /v2/repository/models/{m}/unload          {"parameters": {"version": "1"}} (or all)
    GET|PUT /v2/repository/models/{m}/traffic      {"1": 99, "2": 1}

Load, unload and traffic take the admin key (``--admin-key``) and only it: the user API key
is refused, like a missing or wrong one (401). The index is read-only and also takes the
user API key. Errors are v2's ``{"error": "..."}``.
"""
from __future__ import annotations

import hmac
import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import protocol as P
from ..http_body import read_body
from ..kserve.errors import V2Error
from .config import ModelSpec, VersionSpec, check_engine, check_version, parse_bytes
from .registry import Registry

logger = logging.getLogger("kvserve.registry")


class RepositoryAdmin:
    def __init__(self, registry: Registry, api, admin_key: str | None) -> None:
        self.registry = registry
        self.api = api  # the OpenAI front end: the user API key check and body limits
        self.admin_key = admin_key

    def routes(self) -> list[Route]:
        m = "/v2/repository/models/{model}"
        return [Route("/v2/repository/index", self.index, methods=["POST"]),
                Route(m + "/load", self.load, methods=["POST"]),
                Route(m + "/unload", self.unload, methods=["POST"]),
                Route(m + "/traffic", self.traffic, methods=["GET", "PUT"])]

    # ---- plumbing -------------------------------------------------------------------------
    def _is_admin(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return self.admin_key is not None and hmac.compare_digest(token.encode(),
                                                                  self.admin_key.encode())

    def _check_admin(self, request: Request) -> None:
        if self.admin_key is None:
            raise V2Error("unauthenticated", "the admin API is off: start the server with "
                                             "--admin-key (or KVSERVE_ADMIN_KEY)", status=403)
        if not self._is_admin(request):
            raise V2Error("unauthenticated", "invalid or missing admin key (send "
                                             "'Authorization: Bearer <admin key>')")

    async def _guard(self, request: Request, run, admin: bool = True):
        try:
            try:
                if admin:
                    self._check_admin(request)
                return await run()
            except P.APIError as e:
                raise V2Error.from_status(e.status, e.message, e.headers) from None
        except V2Error as e:
            return JSONResponse(e.body(), status_code=e.http_status, headers=e.headers)
        except Exception:  # noqa: BLE001 - our bug: report it, keep serving
            logger.exception("internal error on %s", request.url.path)
            return JSONResponse({"error": "internal server error"}, status_code=500)

    async def _body(self, request: Request) -> dict:
        raw = await read_body(request, self.api.settings.max_body_bytes,
                              self.api.settings.body_read_timeout)
        return P.parse_json(raw) if raw.strip() else {}

    # ---- endpoints ------------------------------------------------------------------------
    async def index(self, request: Request):
        async def run():
            if not self._is_admin(request):
                self.api.check_auth(request)
            body = await self._body(request)
            ready = body.get("ready", False)
            if not isinstance(ready, bool):
                raise V2Error.bad("'ready' must be true or false")
            return JSONResponse(self.registry.index(ready_only=ready))
        return await self._guard(request, run, admin=False)

    async def load(self, request: Request):
        async def run():
            name = request.path_params["model"]
            params = _params(await self._body(request))
            version, spec, weight, defaults = load_request(self.registry, name, params)
            v = await self.registry.load(name, version, spec, weight, defaults)
            return JSONResponse({"name": name, "version": v.version, "state": v.state})
        return await self._guard(request, run)

    async def unload(self, request: Request):
        async def run():
            params = _params(await self._body(request))
            version = params.get("version")
            if version is not None:
                version = _version(version)
            done = await self.registry.unload(request.path_params["model"], version)
            return JSONResponse({"name": request.path_params["model"], "draining": done})
        return await self._guard(request, run)

    async def traffic(self, request: Request):
        async def run():
            name = request.path_params["model"]
            if request.method == "PUT":
                self.registry.set_traffic(name, await self._body(request))
            model, _ = self.registry.lookup(name)
            return JSONResponse({k: w for k, w in model.traffic.items()})
        return await self._guard(request, run)


_VERSION_KEYS = ("version", "path", "lora", "base", "weight")


def load_request(registry: Registry, name: str, params: dict):
    """Triton's load parameters -> (version, VersionSpec, weight, ModelSpec defaults).
    The version's own keys may also sit in ``config`` (JSON), which is all that
    tritonclient's ``load_model(name, config=...)`` can send."""
    unknown = sorted(set(params) - {*_VERSION_KEYS, "config"})
    if unknown:
        raise V2Error.bad(f"unknown load parameters: {', '.join(unknown)} (takes version, "
                          f"path, lora, base, weight, config)")
    config = params.get("config", "{}")
    try:
        config = json.loads(config) if isinstance(config, str) else config
    except ValueError as e:
        raise V2Error.bad(f"parameter 'config' is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise V2Error.bad("parameter 'config' must be a JSON object of engine settings")
    params = {**{k: config.pop(k) for k in _VERSION_KEYS if k in config}, **params}
    model = registry.models.get(name)
    memory = config.pop("memory", None)
    idle = config.pop("idle_unload_s", None)
    try:
        engine = check_engine(config, "config")
        spec = VersionSpec(**{k: params[k] for k in ("path", "lora", "base") if k in params},
                           engine=engine if "lora" not in params else {})
        for key in ("path", "lora", "base"):
            value = getattr(spec, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"parameter '{key}' must be a non-empty string")
        if (spec.path is None) == (spec.lora is None):
            raise ValueError("give 'path' (a full model) or 'lora' and 'base' (an adapter)")
        if spec.lora is not None and spec.base is None:
            raise ValueError("a LoRA version needs 'base': a full version, \"1\" or "
                             "\"model:1\"")
        defaults = None
        if model is None:
            defaults = ModelSpec(name, {}, {}, engine,
                                 parse_bytes(memory, "memory") if memory is not None else None,
                                 None if idle is None else float(idle))
        elif memory is not None or idle is not None:
            raise ValueError("'memory' and 'idle_unload_s' are set when a model is first "
                             "loaded")
    except (ValueError, TypeError) as e:
        raise V2Error.bad(str(e)) from None
    version = params.get("version")
    if version is None:
        known = [int(k) for k in (model.versions if model else {}) if k.isdigit()]
        version = str(max(known, default=0) + 1)
    version = _version(version)
    weight = params.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or weight < 0):
        raise V2Error.bad("parameter 'weight' must be a number >= 0")
    return version, spec, None if weight is None else float(weight), defaults


def _params(body: dict) -> dict:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise V2Error.bad("'parameters' must be an object")
    return params


def _version(value) -> str:
    try:
        return check_version(value, "version")
    except ValueError as e:
        raise V2Error.bad(str(e)) from None


def model_cards(registry: Registry) -> list[dict]:
    """/v1/models: each routable model by name, and registry models' versions as "m:v"."""
    cards = []
    for model in registry.models.values():
        routable = [k for k in registry.versions_of(model.name)]
        if not routable:
            continue
        shown = registry.shown_version(model, None)
        entries = [(model.name, shown)]
        if model.show_version:
            entries += [(f"{model.name}:{k}", model.versions[k]) for k in routable]
        for card_id, v in entries:
            parent = None
            if v.base is not None:
                parent = v.base.model if not model.show_version else \
                    f"{v.base.model}:{v.base.version}"
            cards.append({"id": card_id, "object": "model", "created": P.now(),
                          "owned_by": "kvserve", "max_model_len": v.max_model_len,
                          "root": v.spec.lora or v.spec.path or card_id, "parent": parent})
    return cards
