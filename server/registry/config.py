"""The registry's TOML (``kvserve serve --config registry.toml``), checked into dataclasses
before anything loads: every mistake names its key.

    memory_budget = "8GiB"              # all models together; each model then needs its share
    [models.smol]
    memory = "3GiB"                     # weights + KV pools of every loaded version of it
    traffic = {"1" = 99, "2" = 1}       # default: the newest version takes all
    idle_unload_s = 600                 # scale to zero after this long without a request
    engine = {dtype = "float32", kv_cache_memory_bytes = 268435456}
    [models.smol.versions.1]
    path = "/models/smol-v1"            # an HF directory or a .gguf file
    [models.smol.versions.2]
    lora = "/adapters/smol-chat"        # a PEFT adapter on a full version: cheap, shares
    base = "1"                          # its weights and KV pool ("other-model:1" works too)
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

# EngineConfig fields the registry sets itself (enable_lora too, for a full version that a
# configured LoRA version names as its base; set it to load adapters onto it at run time)
_RESERVED_ENGINE = {"model"}
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


@dataclass(frozen=True)
class VersionSpec:
    path: str | None = None  # a full model: HF directory or .gguf file
    lora: str | None = None  # or a PEFT adapter directory...
    base: str | None = None  # ...on this full version: "2" (same model) or "model:2"
    engine: dict = field(default_factory=dict)  # EngineConfig overrides (full versions)

    @property
    def is_lora(self) -> bool:
        return self.lora is not None


@dataclass
class ModelSpec:
    name: str
    versions: dict[str, VersionSpec]
    traffic: dict[str, float]
    engine: dict = field(default_factory=dict)
    memory_bytes: int | None = None
    idle_unload_s: float | None = None


@dataclass
class RegistrySpec:
    models: dict[str, ModelSpec]
    memory_budget_bytes: int | None = None


def is_registry(data: dict) -> bool:
    """A config file with a [models] table is a registry; otherwise it is flat settings."""
    return isinstance(data.get("models"), dict)


def parse_bytes(value, where: str) -> int:
    """1073741824, "1GiB", "512 MiB", "2GB" -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if n > 0:
                return n
    raise ValueError(f"{where}: expected a positive size in bytes or like \"2GiB\", got "
                     f"{value!r:.60}")


def check_name(name, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} {name!r:.80} must be 1-128 letters, digits, '.', '_' or "
                         f"'-', starting with a letter or digit")
    return name


def check_version(version, where: str) -> str:
    version = str(version) if isinstance(version, int) and not isinstance(version, bool) \
        else version
    if not isinstance(version, str) or not version.isdigit() or len(version) > 9 \
            or int(version) < 1:
        raise ValueError(f"{where}: versions are positive integers, got {version!r:.40}")
    return str(int(version))


def check_engine(settings, where: str) -> dict:
    from engine.core.config import EngineConfig

    if not isinstance(settings, dict):
        raise ValueError(f"{where}: expected a table of engine settings")
    known = {f.name for f in dataclasses.fields(EngineConfig)} - _RESERVED_ENGINE
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{where}: unknown engine settings {', '.join(unknown)}")
    return dict(settings)


def parse_version(raw, where: str) -> VersionSpec:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table with 'path', or 'lora' and 'base'")
    unknown = sorted(set(raw) - {"path", "lora", "base", "engine"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
    path, lora, base = raw.get("path"), raw.get("lora"), raw.get("base")
    for key, value in (("path", path), ("lora", lora), ("base", base)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}.{key}: expected a non-empty string")
    if (path is None) == (lora is None):
        raise ValueError(f"{where}: give either 'path' (a full model) or 'lora' (an adapter)")
    if lora is not None and base is None:
        raise ValueError(f"{where}: a LoRA version needs 'base', the full version it runs on "
                         f"(\"1\" or \"model:1\")")
    if path is not None and base is not None:
        raise ValueError(f"{where}: 'base' is only for LoRA versions")
    engine = check_engine(raw.get("engine", {}), f"{where}.engine")
    if lora is not None and engine:
        raise ValueError(f"{where}.engine: a LoRA version runs on its base's engine")
    return VersionSpec(path, lora, base, engine)


def parse_model(name: str, raw, where: str) -> ModelSpec:
    check_name(name, "model name")
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = sorted(set(raw) - {"versions", "traffic", "engine", "memory", "idle_unload_s"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
    raw_versions = raw.get("versions")
    if not isinstance(raw_versions, dict) or not raw_versions:
        raise ValueError(f"{where}.versions: at least one version is needed")
    versions = {}
    for v, spec in raw_versions.items():
        key = check_version(v, f"{where}.versions")
        versions[key] = parse_version(spec, f"{where}.versions.{key}")
    from .routing import check_weights, version_order

    if "traffic" in raw:
        try:
            traffic = check_weights({str(k): w for k, w in (raw["traffic"] or {}).items()}
                                    if isinstance(raw["traffic"], dict) else raw["traffic"])
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None
        missing = sorted(set(traffic) - set(versions))
        if missing:
            raise ValueError(f"{where}.traffic: no version {', '.join(missing)}")
    else:
        traffic = {version_order(versions)[0]: 100.0}
    idle = raw.get("idle_unload_s")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, (int, float))
                             or idle <= 0):
        raise ValueError(f"{where}.idle_unload_s: expected seconds > 0")
    memory = parse_bytes(raw["memory"], f"{where}.memory") if "memory" in raw else None
    return ModelSpec(name, versions, traffic, check_engine(raw.get("engine", {}),
                                                          f"{where}.engine"),
                     memory, None if idle is None else float(idle))


def parse_registry(data: dict) -> RegistrySpec:
    """A loaded TOML document -> RegistrySpec; raises ValueError naming the bad key."""
    models = {name: parse_model(name, raw, f"models.{name}")
              for name, raw in data["models"].items()}
    if not models:
        raise ValueError("models: the registry needs at least one model")
    for m in models.values():  # a LoRA version's base must be a full version declared here
        for v, spec in m.versions.items():
            if spec.is_lora:
                base_model, base_version = split_base(spec.base, m.name)
                target = models.get(base_model)
                base = target.versions.get(base_version) if target else None
                if base is None or base.is_lora:
                    raise ValueError(f"models.{m.name}.versions.{v}.base: {spec.base!r} is not "
                                     f"a full version in this registry")
    budget = data.get("memory_budget")
    spec = RegistrySpec(models, parse_bytes(budget, "memory_budget") if budget is not None
                        else None)
    check_budget(spec)
    return spec


def split_base(base: str, model: str) -> tuple[str, str]:
    """"2" -> (model, "2"); "other:2" -> ("other", "2")."""
    name, sep, version = base.rpartition(":")
    return (name if sep else model), version


def check_budget(spec: RegistrySpec) -> None:
    """Refuse shares that do not fit the whole budget, with the numbers."""
    if spec.memory_budget_bytes is None:
        return
    unset = [m.name for m in spec.models.values() if m.memory_bytes is None]
    if unset:
        raise ValueError(f"memory_budget is set, so every model needs its 'memory' share; "
                         f"missing for {', '.join(unset)}")
    total = sum(m.memory_bytes for m in spec.models.values())
    if total > spec.memory_budget_bytes:
        shares = ", ".join(f"{m.name} {gib(m.memory_bytes)}" for m in spec.models.values())
        raise ValueError(f"the models' memory shares add up to {gib(total)}, over the "
                         f"memory_budget of {gib(spec.memory_budget_bytes)} ({shares})")


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
