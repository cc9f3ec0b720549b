"""``kvserve models ...``: a running server's registry through its admin API.

    kvserve models index
    kvserve models load NAME --path DIR [--version 2] [--weight 0] [--config '{"dtype": ...}']
    kvserve models load NAME --lora DIR --base 1 [--version 3]
    kvserve models traffic NAME 1=99 2=1        (no weights: show them)
    kvserve models unload NAME [--version 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve models",
                                description="Load, unload and route model versions of a "
                                            "running kvserve server (its admin API).")
    p.add_argument("--url", default=os.environ.get("KVSERVE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--admin-key", default=os.environ.get("KVSERVE_ADMIN_KEY"))
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("index", help="every model version, its state, traffic and memory")
    load = sub.add_parser("load", help="load a version (returns once it is READY)")
    load.add_argument("name")
    load.add_argument("--version", help="default: one above the highest known")
    what = load.add_mutually_exclusive_group(required=True)
    what.add_argument("--path", help="HF directory or .gguf file")
    what.add_argument("--lora", help="PEFT adapter directory (needs --base)")
    load.add_argument("--base", help="the full version a LoRA version runs on: 1 or model:1")
    load.add_argument("--weight", type=float, help="its traffic once READY (default: 0, or "
                                                   "all of it for a model's first version)")
    load.add_argument("--config", help="engine settings as JSON (and memory, idle_unload_s "
                                       "for a new model)")
    unload = sub.add_parser("unload", help="drain and free a version, or the whole model")
    unload.add_argument("name")
    unload.add_argument("--version")
    traffic = sub.add_parser("traffic", help="show or set a model's weights")
    traffic.add_argument("name")
    traffic.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT")
    return p


def call(url: str, key: str | None, method: str, path: str, body=None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise SystemExit(f"kvserve models: {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"kvserve models: cannot reach {url}: {e.reason}") from None


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    url, key = args.url, args.admin_key
    if args.command == "index":
        rows = call(url, key, "POST", "/v2/repository/index", {})
        print(f"{'MODEL':24} {'VERSION':>7} {'STATE':9} {'TRAFFIC':>8} {'MEMORY':>10}  REASON")
        for r in rows:
            print(f"{r['name']:24} {r['version']:>7} {r['state']:9} "
                  f"{r['traffic_percent']:>7g}% {r['memory_bytes'] / (1 << 20):>8.1f}MB  "
                  f"{r['reason']}")
        return 0
    base = f"/v2/repository/models/{args.name}"
    if args.command == "load":
        params = {k: v for k, v in (("version", args.version), ("path", args.path),
                                    ("lora", args.lora), ("base", args.base),
                                    ("weight", args.weight), ("config", args.config))
                  if v is not None}
        out = call(url, key, "POST", base + "/load", {"parameters": params})
    elif args.command == "unload":
        params = {"version": args.version} if args.version else {}
        out = call(url, key, "POST", base + "/unload", {"parameters": params})
    elif args.weights:
        table = {}
        for item in args.weights:
            version, sep, weight = item.partition("=")
            try:
                table[version] = float(weight)
            except ValueError:
                raise SystemExit(f"kvserve models: traffic takes VERSION=WEIGHT, got "
                                 f"{item!r}") from None
            if not sep:
                raise SystemExit(f"kvserve models: traffic takes VERSION=WEIGHT, got {item!r}")
        out = call(url, key, "PUT", base + "/traffic", table)
    else:
        out = call(url, key, "GET", base + "/traffic")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
