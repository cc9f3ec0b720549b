"""The models a server holds, their versions and the routing table over them.

A full version owns an engine (its weights, KV pool and worker thread) behind a Gateway; a
LoRA version is an adapter on a full version's engine. Each version goes

    LOADING (weights load on a thread; the server keeps serving) -> warm-up -> READY
        -> DRAINING (out of routing; requests in flight finish on it) -> UNLOADED

and a model with ``idle_unload_s`` parks an unused full version as IDLE (engine freed, still
routable: the next request loads it back and waits). A failed load is FAILED with its
reason and changes nothing else. Everything here runs on the event loop, so the routing
table (``Model.traffic``) is swapped by plain assignment.

Request path: ``route`` picks a version and returns its Target; the caller then calls
``Target.gateway.start_streams`` with no ``await`` in between, which is what keeps a
version from draining under a request that was routed to it (Gateway.pending).
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.lora import LoRARequest
from engine.core.sampling_params import SamplingParams

from .. import protocol as P
from ..gateway import Gateway
from .config import ModelSpec, RegistrySpec, VersionSpec, check_name, check_version, gib, \
    split_base
from .routing import check_weights, pick, route_point, version_order

logger = logging.getLogger("kvserve.registry")

LOADING, READY, DRAINING, UNLOADED, IDLE, FAILED = (
    "LOADING", "READY", "DRAINING", "UNLOADED", "IDLE", "FAILED")
_HOLDS_MEMORY = (LOADING, READY, DRAINING)


class Version:
    def __init__(self, model: str, version: str, spec: VersionSpec) -> None:
        self.model, self.version, self.spec = model, version, spec
        self.state = LOADING
        self.reason = ""
        self.gateway: Gateway | None = None  # a LoRA version: its base's
        self.lora: LoRARequest | None = None
        self.base: Version | None = None
        self.memory = 0  # bytes its engine holds (0 for a LoRA version)
        self.max_model_len = 0  # known once it has been up
        self.load_seconds = 0.0  # its last bring-up: load, checks and warm-up
        self.last_used = time.monotonic()
        self.bring_up: asyncio.Task | None = None  # a load or cold reload in progress
        self.owned = True  # its engine was built here (adopted ones belong to the caller)
        self.cold_start = False  # LOADING back from IDLE: requests wait for it

    @property
    def routable(self) -> bool:
        return self.state in (READY, IDLE)


@dataclass
class Model:
    name: str
    versions: dict[str, Version] = field(default_factory=dict)
    traffic: dict[str, float] = field(default_factory=dict)  # swapped whole, never edited
    engine: dict = field(default_factory=dict)
    memory_bytes: int | None = None
    idle_unload_s: float | None = None
    # Models from a registry config report "name:version" as the OpenAI `model`; the
    # plain `--model` / `--lora-modules` ones keep their bare name, as before registries.
    show_version: bool = True


@dataclass(frozen=True)
class Target:
    """What one request runs on."""
    gateway: Gateway
    lora: LoRARequest | None
    model: str
    version: str
    show_version: bool = True

    @property
    def reported(self) -> str:
        return f"{self.model}:{self.version}" if self.show_version else self.model


class Registry:
    def __init__(self, make_engine: Callable[[dict], object],
                 make_gateway: Callable[[object], Gateway], metrics=None,
                 memory_budget_bytes: int | None = None,
                 request_timeout: float | None = None,
                 drain_timeout: float | None = None) -> None:
        self.make_engine = make_engine  # engine kwargs -> a started-able AsyncLLMEngine
        self.make_gateway = make_gateway
        self.metrics = metrics
        self.memory_budget_bytes = memory_budget_bytes
        self.request_timeout = request_timeout
        # how long an unloaded version's requests may run on before they are stopped (a
        # client reading a stream slowly must not pin a version in memory); None: no limit
        self.drain_timeout = drain_timeout
        self.models: dict[str, Model] = {}
        self.default_model: str | None = None  # what a request without `model` gets
        self._lora_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self._lora_bases: set[tuple[str, str]] = set()  # full versions a config adapter needs

    # ---- building ------------------------------------------------------------------------
    def adopt(self, name: str, version: str, async_engine, show_version: bool = False) -> None:
        """A full version whose engine was built outside (the plain `kvserve serve`), READY
        once the event loop starts it."""
        model = self.models.setdefault(name, Model(name, show_version=show_version))
        v = Version(name, version, VersionSpec(path=async_engine.engine.model_dir))
        v.gateway = self.make_gateway(async_engine)
        v.memory = sum(async_engine.engine.memory_bytes().values())
        v.max_model_len = async_engine.engine.max_model_len
        v.state, v.owned = READY, False
        model.versions[version] = v
        model.traffic = {version: 100.0}
        self.default_model = self.default_model or name

    async def start(self, spec: RegistrySpec) -> None:
        """Load every version of a registry config (full ones first); any failure raises."""
        self.memory_budget_bytes = spec.memory_budget_bytes
        for m in spec.models.values():
            self.models[m.name] = Model(m.name, engine=m.engine, memory_bytes=m.memory_bytes,
                                        idle_unload_s=m.idle_unload_s)
        self.default_model = next(iter(spec.models))
        self._lora_bases = {split_base(s.base, m.name) for m in spec.models.values()
                            for s in m.versions.values() if s.is_lora}
        order = [(m, v, s) for m in spec.models.values() for v, s in m.versions.items()]
        order.sort(key=lambda x: x[2].is_lora)
        for m, v, s in order:
            await self.load(m.name, v, s, weight=0.0)
        for m in spec.models.values():
            self.models[m.name].traffic = dict(m.traffic)

    def start_background(self) -> None:
        """The idle reaper (scale to zero); on the event loop that serves."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for t in list(self._tasks):
            t.cancel()
        for model in self.models.values():
            for v in model.versions.values():
                if v.gateway is not None and not v.spec.is_lora:
                    await self._free(v)

    # ---- routing -------------------------------------------------------------------------
    def lookup(self, name: str | None, version: str | None = None) -> tuple[Model, str | None]:
        """The model a request names ("m", "m:v", or None for the default) and the pinned
        version if any; 404 if there is no such model."""
        if name is None:
            name = self.default_model
        model = self.models.get(name)
        if model is None and ":" in name:
            base, _, pinned = name.rpartition(":")
            model = self.models.get(base)
            if model is not None:
                name, version = base, version or pinned
        if model is None:
            raise P.APIError(404, f"The model `{name:.200}` does not exist.", param="model",
                             code="model_not_found")
        return model, version

    async def route(self, name: str | None, version: str | None = None,
                    key: str | None = None) -> Target:
        """The version that serves this request: the pinned one, else by weight from the
        routing key's stable point. Waits for a parked (IDLE) version to load back."""
        model, version = self.lookup(name, version)
        if version is not None:
            v = model.versions.get(version)
            if v is None or not (v.routable or v.cold_start):
                raise P.APIError(404, f"The model `{model.name}` has no ready version "
                                      f"{version:.40}.", param="model", code="model_not_found")
        else:
            traffic = model.traffic
            weights = {k: w for k, w in traffic.items()
                       if w > 0 and k in model.versions and model.versions[k].routable}
            if not weights:
                if any(o.state in (LOADING, DRAINING) for o in model.versions.values()):
                    raise P.APIError(503, f"The model `{model.name}` has no version ready to "
                                          f"serve.", "unavailable", param="model",
                                     headers={"Retry-After": "1"})
                raise P.APIError(404, f"The model `{model.name}` is not loaded.",
                                 param="model", code="model_not_found")
            v = model.versions[pick(weights, route_point(key or secrets.token_hex(8)))]
        await self._ensure_up(model, v)
        now = time.monotonic()
        v.last_used = now
        if v.base is not None:
            v.base.last_used = now
        return Target(v.gateway, v.lora, model.name, v.version, model.show_version)

    @property
    def ready(self) -> bool:
        """Every loaded engine's loop runs, and the default model can take a request."""
        if any(not g.engine.is_running for _, _, g in self.gateways()):
            return False
        model = self.models.get(self.default_model or "")
        return model is not None and any(v.routable for v in model.versions.values())

    def shown_version(self, model: Model, pinned: str | None) -> Version | None:
        """For metadata calls (no loading): the pinned version, else the routable one with
        the most traffic."""
        if pinned is not None:
            v = model.versions.get(pinned)
            return v if v is not None and v.state not in (UNLOADED, FAILED) else None
        routable = [k for k in version_order(model.versions) if model.versions[k].routable]
        if not routable:
            return None
        return model.versions[max(routable, key=lambda k: model.traffic.get(k, 0.0))]

    def versions_of(self, name: str) -> list[str]:
        model = self.models[name]
        return [k for k in version_order(model.versions) if model.versions[k].routable]

    def gateways(self) -> list[tuple[str, str, Gateway]]:
        """(model, version, gateway) of every full version that holds an engine now."""
        return [(m.name, v.version, v.gateway) for m in self.models.values()
                for v in m.versions.values() if v.gateway is not None and not v.spec.is_lora]

    def rows(self) -> list[tuple]:
        """For /metrics: (model, version, state, memory bytes, traffic share, the full
        version's AsyncLLMEngine or None)."""
        out = []
        for m in self.models.values():
            total = sum(m.traffic.values()) or 1.0
            for k, v in m.versions.items():
                engine = v.gateway.engine if v.gateway is not None and not v.spec.is_lora \
                    else None
                out.append((m.name, k, v.state, v.memory, m.traffic.get(k, 0.0) / total,
                            engine))
        return out

    # ---- admin: load, unload, traffic ---------------------------------------------------
    def adopt_lora(self, name: str, path: str, base_model: str) -> None:
        """An adapter served from the start as a model of its own (``--lora-modules``),
        checked now: a bad one fails the start."""
        if name in self.models:
            raise ValueError(f"a model named {name!r:.200} is already being served")
        base = self.models[base_model].versions["1"]
        engine = base.gateway.engine.engine
        v = Version(name, "1", VersionSpec(lora=path, base=f"{base_model}:1"))
        v.lora = LoRARequest(name, next(self._lora_ids), path)
        engine.resolve_lora(v.lora)
        v.base, v.gateway, v.max_model_len, v.state = base, base.gateway, base.max_model_len, READY
        self.models[name] = Model(name, {"1": v}, {"1": 100.0}, show_version=False)

    async def load(self, name: str, version: str, spec: VersionSpec,
                   weight: float | None = None, defaults: ModelSpec | None = None,
                   show_version: bool = True) -> Version:
        """Bring a version up (LOADING -> warm-up -> READY) without touching routing until
        it is READY. ``weight``: its share of traffic once ready (default: all of it if the
        model has no other routable version, else 0). Raises APIError (4xx) on failure,
        leaving routing as it was and the reason in the index."""
        try:
            check_name(name, "model name")
            version = check_version(version, "version")
        except ValueError as e:
            raise P.APIError(400, str(e), param="name") from None
        model = self.models.get(name)
        if model is None:
            model = Model(name, engine=dict(defaults.engine) if defaults else {},
                          memory_bytes=defaults.memory_bytes if defaults else None,
                          idle_unload_s=defaults.idle_unload_s if defaults else None,
                          show_version=show_version)
            self._check_new_share(model)
            self.models[name] = model
            self.default_model = self.default_model or name
        old = model.versions.get(version)
        if old is not None and old.state not in (UNLOADED, FAILED):
            raise P.APIError(409, f"{name} version {version} is {old.state}; unload it first.",
                             code="conflict")
        v = Version(name, version, spec)
        model.versions[version] = v
        try:
            await self._bring_up(model, v)
        except Exception as e:  # noqa: BLE001 - any failure of a load is reported, not raised raw
            v.state, v.reason = FAILED, _reason(e)
            logger.warning("loading %s version %s failed: %s", name, version, v.reason)
            await self._free(v)
            raise P.APIError(400, f"failed to load {name} version {version}: {v.reason}",
                             code="load_failed") from None
        v.state = READY
        routable = [k for k, w in model.traffic.items() if w > 0 and k != version
                    and k in model.versions and model.versions[k].routable]
        if weight is None:
            weight = 0.0 if routable else 100.0
        if weight > 0 or not routable:
            model.traffic = {**model.traffic, version: weight or 100.0}
        return v

    async def unload(self, name: str, version: str | None = None) -> list[str]:
        """Take a version (or every version) out of routing now; each drains, then frees its
        engine. Returns the versions that were unloaded."""
        model, _ = self.lookup(name)
        if version is not None:
            version = check_version(version, "version")
            if version not in model.versions or model.versions[version].state in (UNLOADED,
                                                                                    FAILED):
                raise P.APIError(404, f"{name} has no loaded version {version:.40}.",
                                 code="model_not_found")
            chosen = [version]
        else:
            chosen = [k for k, v in model.versions.items() if v.state not in (UNLOADED, FAILED)]
        for k in chosen:
            v = model.versions[k]
            if v.state == LOADING:
                raise P.APIError(409, f"{name} version {k} is still loading.", code="conflict")
            users = [f"{o.model}:{o.version}" for m in self.models.values()
                     for o in m.versions.values()
                     if o.base is v and o.state in (LOADING, READY, IDLE)
                     and not (o.model == name and o.version in chosen)]
            if users:
                raise P.APIError(409, f"{name} version {k} is the base of {', '.join(users)}; "
                                      f"unload those first.", code="conflict")
        left = {k: w for k, w in model.traffic.items() if k not in chosen}
        if version is not None and not any(
                w > 0 and model.versions[k].routable for k, w in left.items()):
            raise P.APIError(409, f"{name} version {version} carries all of the model's "
                                  f"traffic; move it to another version first "
                                  f"(PUT /v2/repository/models/{name}/traffic).",
                             code="conflict")
        model.traffic = left  # the swap: new requests stop coming here at once
        for k in sorted(chosen, key=lambda k: not model.versions[k].spec.is_lora):
            self._spawn(self._drain(model.versions[k]))
        return chosen

    def set_traffic(self, name: str, weights) -> dict[str, float]:
        """Replace a model's weights in one assignment; every named version must be READY
        (or parked IDLE). Raises APIError 400 and changes nothing on a bad table."""
        model, _ = self.lookup(name)
        try:
            checked = check_weights(weights)
            checked = {check_version(k, "traffic"): w for k, w in checked.items()}
        except ValueError as e:
            raise P.APIError(400, str(e), param="traffic") from None
        for k in checked:
            v = model.versions.get(k)
            if v is None or not v.routable:
                state = "not loaded" if v is None else v.state
                raise P.APIError(400, f"traffic: {name} version {k} is {state}; only READY "
                                      f"versions take traffic.", param="traffic")
        model.traffic = checked
        return checked

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index, plus traffic, memory and the routing weights."""
        out = []
        for m in self.models.values():
            total = sum(m.traffic.values()) or 1.0
            for k in version_order(m.versions):
                v = m.versions[k]
                if ready_only and v.state != READY:
                    continue
                entry = {"name": m.name, "version": k, "state": v.state, "reason": v.reason,
                         "kind": "lora" if v.spec.is_lora else "full",
                         "traffic_percent": round(100.0 * m.traffic.get(k, 0.0) / total, 4),
                         "memory_bytes": v.memory, "load_seconds": round(v.load_seconds, 3)}
                if v.spec.is_lora:
                    entry["base"] = f"{v.base.model}:{v.base.version}" if v.base else v.spec.base
                out.append(entry)
        return out

    # ---- lifecycle -------------------------------------------------------------------------
    async def _bring_up(self, model: Model, v: Version) -> None:
        t0 = time.monotonic()
        if v.spec.is_lora:
            await self._attach_lora(model, v)
        else:
            await self._start_engine(model, v)
        await self._warm_up(v)
        v.load_seconds = time.monotonic() - t0

    async def _start_engine(self, model: Model, v: Version) -> None:
        kwargs = {**model.engine, **v.spec.engine, "model": v.spec.path}
        if (model.name, v.version) in self._lora_bases:
            kwargs["enable_lora"] = True
        kv = kwargs.get("kv_cache_memory_bytes")
        if kv is not None:
            self._check_budget(model, v, kv, "its KV pool alone")
        async_engine = await asyncio.to_thread(self.make_engine, kwargs)
        v.gateway = self.make_gateway(async_engine)  # from here on, _free stops it
        async_engine.start()
        v.memory = sum(async_engine.engine.memory_bytes().values())
        v.max_model_len = async_engine.engine.max_model_len
        self._check_budget(model, v, v.memory, "its weights and KV pool")

    async def _attach_lora(self, model: Model, v: Version) -> None:
        base_name, base_version = split_base(v.spec.base, model.name)
        base_model = self.models.get(base_name)
        base = base_model.versions.get(base_version) if base_model else None
        if base is None or base.spec.is_lora or base.state not in (READY, IDLE):
            raise ValueError(f"its base {v.spec.base!r} is not a ready full version")
        await self._ensure_up(base_model, base)
        if base.gateway.engine.engine.runner.lora is None:
            raise ValueError(f"its base {base_name}:{base_version} was loaded without LoRA "
                             f"(set enable_lora = true in that model's engine settings)")
        v.base, v.gateway = base, base.gateway
        v.max_model_len = base.max_model_len
        name = f"{model.name}:{v.version}" if model.show_version else model.name
        v.lora = LoRARequest(name, next(self._lora_ids), v.spec.lora)
        engine = base.gateway.engine.engine
        await base.gateway.run_prep(lambda: engine.resolve_lora(v.lora))

    async def _warm_up(self, v: Version) -> None:
        """One short greedy request end to end, before any user request reaches it."""
        engine = v.gateway.engine
        vocab = engine.engine.model_config.vocab_size
        params = SamplingParams(max_tokens=1, temperature=0.0)
        streams = await v.gateway.start_streams(f"warmup-{secrets.token_hex(4)}",
                                                [[1 % vocab, 2 % vocab]], params, lora=v.lora)
        try:
            async for _ in streams[0]:
                pass
        finally:
            streams[0].close()

    def _check_budget(self, model: Model, v: Version, need: int, what: str) -> None:
        mine = sum(o.memory for o in model.versions.values()
                   if o is not v and o.state in _HOLDS_MEMORY)
        if model.memory_bytes is not None and mine + need > model.memory_bytes:
            raise ValueError(f"over {model.name}'s memory share: {what} needs {gib(need)}, "
                             f"{gib(mine)} of {gib(model.memory_bytes)} is already in use")
        if self.memory_budget_bytes is not None:
            used = sum(o.memory for m in self.models.values() for o in m.versions.values()
                       if o is not v and o.state in _HOLDS_MEMORY)
            if used + need > self.memory_budget_bytes:
                raise ValueError(f"over the server's memory budget: {what} needs "
                                 f"{gib(need)}, {gib(used)} of "
                                 f"{gib(self.memory_budget_bytes)} is already in use")

    def _check_new_share(self, model: Model) -> None:
        if self.memory_budget_bytes is None:
            return
        if model.memory_bytes is None:
            raise P.APIError(400, "this server has a memory budget: a new model needs its "
                                  "'memory' share", param="memory")
        taken = sum(m.memory_bytes or 0 for m in self.models.values())
        if taken + model.memory_bytes > self.memory_budget_bytes:
            raise P.APIError(400, f"{model.name}'s share of {gib(model.memory_bytes)} does not "
                                  f"fit: {gib(taken)} of {gib(self.memory_budget_bytes)} is "
                                  f"already shared out", param="memory")

    async def _ensure_up(self, model: Model, v: Version) -> None:
        """A parked version loads back (once, however many requests wait for it)."""
        if v.state == IDLE and v.bring_up is None:
            v.bring_up = self._spawn(self._cold_start(model, v))
        if v.bring_up is not None and v.bring_up is not asyncio.current_task():
            try:
                async with asyncio.timeout(self.request_timeout):
                    await asyncio.shield(v.bring_up)
            except TimeoutError as e:
                raise P.APIError(504, f"{model.name} version {v.version} is loading and took "
                                      f"over {self.request_timeout}s", "timeout_error",
                                 code="request_timeout") from e
        if v.state != READY:
            raise P.APIError(503, f"{model.name} version {v.version} is {v.state}: "
                                  f"{v.reason}", "unavailable", headers={"Retry-After": "1"})

    async def _cold_start(self, model: Model, v: Version) -> None:
        t0 = time.monotonic()
        v.state, v.cold_start = LOADING, True
        try:
            await self._bring_up(model, v)
        except Exception as e:  # noqa: BLE001 - parked again, with the reason; requests get 503
            v.state, v.reason = IDLE, f"reload failed: {_reason(e)}"
            await self._free(v)
            return
        finally:
            v.bring_up, v.cold_start = None, False
        v.state, v.reason = READY, ""
        if self.metrics is not None:
            self.metrics.cold_starts.labels(model.name).observe(time.monotonic() - t0)

    async def _drain(self, v: Version) -> None:
        v.state = DRAINING
        if not v.spec.is_lora and v.gateway is not None:
            deadline = None if self.drain_timeout is None else \
                time.monotonic() + self.drain_timeout
            # a dead engine never goes idle: nothing runs on it any more either
            while not v.gateway.idle and v.gateway.engine.is_running:
                if deadline is not None and time.monotonic() >= deadline:
                    logger.warning("%s version %s: requests still running after the %.1f s "
                                   "drain timeout; stopping them", v.model, v.version,
                                   self.drain_timeout)
                    break  # stopping the engine ends them (their streams with an error)
                await asyncio.sleep(0.02)
            await self._free(v)
        v.state, v.lora, v.gateway = UNLOADED, None, None

    async def _free(self, v: Version) -> None:
        """Stop a full version's engine and drop every reference to it."""
        gateway, v.gateway, v.memory = v.gateway, None, 0
        if gateway is not None and not v.spec.is_lora:
            await gateway.engine.stop()
            if v.owned:  # joins TP workers: off the loop
                await asyncio.to_thread(gateway.engine.engine.close)
            gateway.close()
            del gateway
            gc.collect()

    async def _reap_idle(self) -> None:
        """Park full versions that nobody used for their model's idle_unload_s."""
        while True:
            await asyncio.sleep(self._reap_interval())
            now = time.monotonic()
            # a LoRA version's requests also touch its base's last_used
            idle = [v for m in list(self.models.values()) if m.idle_unload_s
                    for v in list(m.versions.values())
                    if v.state == READY and not v.spec.is_lora and v.gateway is not None
                    and v.gateway.idle and now - v.last_used >= m.idle_unload_s]
            for v in idle:
                try:
                    await self._park(v)
                except Exception:  # noqa: BLE001 - one bad park must not end scale to zero
                    logger.exception("parking %s version %s failed", v.model, v.version)

    async def _park(self, v: Version) -> None:
        if v.state != READY or v.gateway is None or not v.gateway.idle:
            return  # a request came while others were parked
        seconds = self.models[v.model].idle_unload_s
        v.state = IDLE
        v.reason = f"no request for {seconds:g} s: freed; the next request loads it"
        await self._free(v)
        for m in list(self.models.values()):
            for o in list(m.versions.values()):
                if o.base is v and o.state == READY:
                    o.state, o.gateway, o.reason = IDLE, None, v.reason

    def _reap_interval(self) -> float:
        idles = [m.idle_unload_s for m in self.models.values() if m.idle_unload_s]
        return max(0.05, min([1.0, *(i / 4 for i in idles)]))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _reason(e: BaseException) -> str:
    if isinstance(e, P.APIError):
        return e.message
    text = str(e) or type(e).__name__
    return text[:500]
