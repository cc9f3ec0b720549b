"""The ``kvserve`` command: ``kvserve serve`` (OpenAI-compatible HTTP) and ``kvserve generate``."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import tomllib

USAGE = """usage: kvserve serve [--model PATH] [--host H] [--port P] [options]   (serve -h for all)
       kvserve serve --config registry.toml   several models and versions (README: Registry)
       kvserve models index|load|unload|traffic ...   a running server's registry (admin key)
       kvserve router --backend URL [URL ...]   prefix-aware router in front of replicas
       kvserve generate PROMPT [PROMPT ...] [options]                (generate -h for all)
       kvserve info [--json]      CPU features, auto dtype, C++ ops, versions"""

SERVER_KEYS = ("host", "port", "served_model_name", "api_key", "max_waiting_requests",
               "request_timeout", "max_body_bytes", "log_level", "body_read_timeout",
               "header_read_timeout", "trust_request_chat_template", "exit_on_engine_death",
               "engine_death_grace", "grpc_port", "grpc_max_message_bytes",
               "tool_call_parser", "chat_template", "lora_modules",
               "allow_runtime_lora_updates", "admin_key", "memory_budget", "models",
               "data_parallel_size")


PRESETS_DIR = os.path.join(os.path.dirname(__file__), "presets")  # configs/ links here


def seconds(value: str) -> float:
    """A duration flag: a finite number >= 0 (argparse type)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"seconds must be finite and >= 0, got {value!r}")
    return x


def presets() -> list[str]:
    """Names of the presets shipped inside the package (``--config NAME``)."""
    return sorted(f[:-5] for f in os.listdir(PRESETS_DIR) if f.endswith(".toml"))


def config_path(name_or_path: str) -> str:
    """A preset's file for its name (``cpu-lowlatency``), else the path as given."""
    if os.sep not in name_or_path and not name_or_path.endswith(".toml"):
        if name_or_path not in presets():
            raise SystemExit(f"kvserve: no preset {name_or_path!r}; presets: "
                             f"{', '.join(presets())} (or pass a .toml path)")
        return os.path.join(PRESETS_DIR, name_or_path + ".toml")
    return name_or_path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"a preset by name ({', '.join(presets())}) or a TOML "
                                    f"file of defaults; flags override it")
    p.add_argument("--model", help="HF directory or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--dtype")
    p.add_argument("--block-size", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--attention-backend", help="cpu | torch | triton (default by device)")
    p.add_argument("--quantization", choices=["int4", "int8", "int4+int8"],
                   help="CPU: int4 = weight-only int4 for small-batch steps; int8 = int8 x int8 "
                        "matmuls for every step; int4+int8 = int4 small, int8 large steps "
                        "(none is fp32-exact)")
    p.add_argument("--int4-max-rows", type=int, help="largest step that takes the int4 path")
    p.add_argument("--kv-cache-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="KV pool dtype (auto = the model's); CPU: bfloat16 under float32 "
                        "halves decode attention's memory traffic")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="CUDA: no decode CUDA graphs (slower; for a capture that fails)")
    p.add_argument("--cpu-compile", action="store_true", default=None,
                   help="torch.compile decode steps on CPU (slow first start, then cached)")
    p.add_argument("--cpu-compile-max-batch", type=int,
                   help="with --cpu-compile: decode steps of more sequences run eagerly")
    p.add_argument("--enable-lora", action="store_true", default=None,
                   help="serve LoRA adapters of this model (implied by --lora-modules)")
    p.add_argument("--max-loras", type=int, help="adapters on the device at once (default 4)")
    p.add_argument("--max-lora-rank", type=int, help="largest adapter rank (default 16)")
    p.add_argument("--max-cpu-loras", type=int,
                   help="adapters kept in CPU memory (default: --max-loras)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int,
                   help="split the model over this many ranks (worker processes; gloo on CPU)")
    p.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                   help="how tensor-parallel workers run (mp: spawned processes; ray: Ray "
                        "actors in a placement group)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", default=None)
    p.add_argument("--max-prompt-chars", type=int,
                   help="longest text prompt, checked before tokenizing (default: "
                        "max_model_len x the longest vocabulary entry)")


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve serve", description="OpenAI-compatible and KServe v2 / Triton (HTTP + gRPC) server.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="name clients use (default: from the model path)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="KServe v2 / Triton gRPC port, on --host (0: no gRPC)")
    p.add_argument("--grpc-max-message-bytes", type=int, default=64 << 20,
                   help="largest gRPC message either way (default 64 MiB)")
    p.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="required as 'Authorization: Bearer KEY' (HTTP header or gRPC "
                        "metadata) on /v1 and /v2/models")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="queue bound in sequences (prompts x n); beyond it requests get "
                        "503 + Retry-After")
    p.add_argument("--request-timeout", type=seconds, help="seconds before a request is aborted")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20)
    p.add_argument("--header-read-timeout", type=seconds, default=10.0,
                   help="seconds for a request's headers to arrive (then 408 and close)")
    p.add_argument("--body-read-timeout", type=seconds, default=30.0,
                   help="seconds for a request's body to arrive (then 408)")
    p.add_argument("--trust-request-chat-template", action="store_true", default=False,
                   help="let requests bring their own chat_template (code the server runs)")
    p.add_argument("--tool-call-parser", default="auto",
                   choices=["auto", "none", "hermes", "smollm2"],
                   help="how the model writes tool calls (auto: from its chat template)")
    p.add_argument("--chat-template", help="a Jinja chat template file to use instead of "
                                           "the tokenizer's")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) served as models by these names")
    p.add_argument("--allow-runtime-lora-updates", action="store_true", default=False,
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--admin-key", default=os.environ.get("KVSERVE_ADMIN_KEY"),
                   help="enables the registry's admin API (/v2/repository/models/...: load, "
                        "unload, traffic), which takes this key and not --api-key")
    p.add_argument("--drain-timeout", type=seconds, default=300.0, metavar="SECONDS",
                   help="after a version is unloaded, how long its requests in flight may "
                        "run before they are stopped (0: no limit)")
    p.add_argument("--no-exit-on-engine-death", dest="exit_on_engine_death",
                   action="store_false", default=True,
                   help="keep serving 503s if the engine loop dies (default: exit 1 so a "
                        "supervisor restarts the server)")
    p.add_argument("--engine-death-grace", type=seconds, default=2.0,
                   help="seconds between the engine loop dying and the process exiting")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="run this many replicas (each its own process and engine) behind a "
                        "prefix-aware router on --port")
    p.add_argument("--log-level", default="info")
    p.add_argument("--seed", type=int)
    return p


def merge_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   extra_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(engine kwargs, other settings): TOML config first, then flags given explicitly."""
    from engine.core.config import EngineConfig

    merged: dict = {}
    if args.config:
        with open(config_path(args.config), "rb") as f:
            merged.update(tomllib.load(f))
    defaults = vars(parser.parse_args([]))
    for key, value in vars(args).items():
        if key != "config" and (value != defaults.get(key) or key not in merged):
            merged[key] = value
    engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = {k for k in merged if k not in engine_keys and k not in extra_keys
               and k not in vars(args)}
    if unknown:
        parser.error(f"unknown settings in config: {', '.join(sorted(unknown))}")
    engine_kwargs = {k: v for k, v in merged.items() if k in engine_keys and v is not None}
    return engine_kwargs, {k: v for k, v in merged.items() if k not in engine_keys}


def load_settings(argv: list[str]) -> tuple[dict, dict]:
    parser = serve_parser()
    return merge_settings(parser, parser.parse_args(argv), SERVER_KEYS)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv less these flags and their values (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if a.split("=", 1)[0] in flags:
            continue
        out.append(a)
    return out


def serve(argv: list[str]) -> int:
    import uvicorn

    from engine.async_engine import AsyncLLMEngine
    from engine.core.config import EngineConfig

    from .app import build_app

    engine_kwargs, srv = load_settings(argv)
    if srv.get("data_parallel_size", 1) > 1:
        from .router.cli import serve_replicas

        logging.basicConfig(level=srv.get("log_level", "info").upper())
        rest = _without(argv, ("--data-parallel-size", "-dp", "--port", "--host", "--grpc-port"))
        return serve_replicas(rest, srv["data_parallel_size"], srv.get("host", "127.0.0.1"),
                              srv.get("port", 8000), srv.get("log_level", "info"),
                              srv.get("grpc_port", 8001) or 0)
    loras = lora_modules(srv.get("lora_modules"))
    if loras:
        engine_kwargs["enable_lora"] = True
    logging.basicConfig(level=srv.get("log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry_spec = _registry_spec(srv, engine_kwargs)
    async_engine = None
    max_waiting = srv.get("max_waiting_requests")
    if registry_spec is None:
        # Loaded on the thread that will run it: one OpenMP thread team per process.
        async_engine = AsyncLLMEngine.from_config(EngineConfig(**engine_kwargs), max_waiting)
        name = srv.get("served_model_name") or _default_name(engine_kwargs.get("model"))
    else:
        name = next(iter(registry_spec.models))
    settings = server_settings(srv, name, loras)
    app = build_app(async_engine, settings, registry_spec, lambda kwargs: (
        AsyncLLMEngine.from_config(EngineConfig(**kwargs), max_waiting)))
    if async_engine is None:
        _check_ports(srv)
    server = uvicorn.Server(uvicorn.Config(
        app, host=srv.get("host", "127.0.0.1"), port=srv.get("port", 8000),
        log_level=srv.get("log_level", "info"), timeout_graceful_shutdown=5,
        **_http_protocol(srv.get("header_read_timeout", 10.0))))
    settings.request_shutdown = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    finally:
        if async_engine is not None:
            async_engine.engine.close()  # tensor-parallel workers, the grammar thread
    if async_engine is not None and async_engine.dead_error is not None:
        logging.getLogger("kvserve.server").error("exiting with status 1: the engine loop died")
        return 1
    return 0


def server_settings(srv: dict, name: str, loras: dict[str, str]):
    """The ServerSettings of merged `serve` settings (flags over the TOML config)."""
    from .app import ServerSettings

    return ServerSettings(
        served_model_name=name, api_key=srv.get("api_key"),
        request_timeout=srv.get("request_timeout"),
        max_body_bytes=srv.get("max_body_bytes", 8 << 20),
        body_read_timeout=srv.get("body_read_timeout", 30.0),
        trust_request_chat_template=bool(srv.get("trust_request_chat_template")),
        exit_on_engine_death_after=(srv.get("engine_death_grace", 2.0)
                                    if srv.get("exit_on_engine_death", True) else None),
        grpc_port=srv.get("grpc_port", 8001) or None, grpc_host=srv.get("host", "127.0.0.1"),
        grpc_max_message_bytes=srv.get("grpc_max_message_bytes", 64 << 20),
        tool_call_parser=srv.get("tool_call_parser", "auto"),
        chat_template=_read_template(srv.get("chat_template")), lora_modules=loras,
        allow_runtime_lora_updates=bool(srv.get("allow_runtime_lora_updates")),
        admin_key=srv.get("admin_key"), drain_timeout=srv.get("drain_timeout", 300.0) or None)


def _registry_spec(srv: dict, engine_kwargs: dict):
    """The registry a ``--config`` file declares ([models] tables), else None. Engine flags
    given on the command line are defaults under every model's own engine settings."""
    if srv.get("models") is None:
        return None
    from .registry.config import parse_registry

    if srv.get("lora_modules"):
        raise SystemExit("kvserve: with a registry config, declare adapters as LoRA versions "
                         "in it, not with --lora-modules")
    data = {"models": srv["models"]}
    if srv.get("memory_budget") is not None:
        data["memory_budget"] = srv["memory_budget"]
    try:
        spec = parse_registry(data)
    except ValueError as e:
        raise SystemExit(f"kvserve: registry config: {e}") from None
    defaults = {k: v for k, v in engine_kwargs.items() if k != "model"}
    for m in spec.models.values():
        m.engine = {**defaults, **m.engine}
    return spec


def _check_ports(srv: dict) -> None:
    """A registry loads its models while the server starts: fail fast, before that, if the
    HTTP port is taken."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((srv.get("host", "127.0.0.1"), srv.get("port", 8000)))
        except OSError as e:
            raise SystemExit(f"kvserve: cannot listen on port {srv.get('port', 8000)}: {e}") \
                from None


def lora_modules(value) -> dict[str, str]:
    """``--lora-modules a=/p b=/q`` (or in TOML, that list or a table) -> {name: path}."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for item in value:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"kvserve: --lora-modules takes NAME=PATH, got {item!r}")
        out[name] = path
    return out


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _http_protocol(header_timeout: float | None) -> dict:
    """uvicorn's h11 protocol with a deadline for request headers (uvicorn has none)."""
    if not header_timeout:
        return {}
    from .http_timeouts import protocol_with_header_timeout

    return {"http": protocol_with_header_timeout(header_timeout)}


def _default_name(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "router":
        from .router.cli import main as router_main
        return router_main(rest)
    if command == "models":
        from .registry.cli import main as models_main
        return models_main(rest)
    if command == "generate":
        from .batch import main as batch_main
        return batch_main(rest)
    if command == "info":
        from .info import main as info_main
        return info_main(rest)
    print(f"kvserve: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
