"""The GPU check: what the CUDA path does on a real device, in one call of about 9 minutes.

    python3 bench/gpu_check.py --out DIR [--budget 540]    # on a CUDA machine
    python3 bench/gpu_check.py --out DIR --cpu-dry-run      # the same steps here, in the
                                                            # Triton interpreter, tiny model

bench/gpu_check.sh wraps this for the lent machine (carried wheels, $OUT). Each step runs in
its own child process with its own time limit, so a hang or a crash costs that step only.
DIR gets three files (the device tool brings back at most eight): summary.json (every step's
result), summary.md (the table for README) and steps.log (every child's output). Steps, in
order of value:

    versions      python, torch, triton, transformers, device, SMs, free memory
    kernel_tests  tests/test_kernels.py + tests/test_fused_kernels.py on the device
    parity        Triton vs torch backend, greedy tokens, fp32, batch 8 (random SmolLM2-shaped
                  checkpoint built there: the bundled GGUF is too large to carry)
    engine        KV budget and blocks vs mem_get_info; captured graph sizes; decode ms/step
                  at batch 1 and 64 (CUDA events around replay/forward vs wall time, graphs
                  and eager); kernels per decode step (torch.profiler); Triton variants
                  compiled in steady state; host syncs per step (set_sync_debug_mode)
    attention     paged-attention GB/s at SmolLM2 shapes (1 x 8k, 64 x 1k; split-KV and
                  unified) vs the device's copy bandwidth
    kernel_bench  bench/kernels.py with whatever time is left: SmolLM2 and Llama-3-8B head
                  shapes, batch 1 / 64, 512 / 8k contexts, prefill, KV store

The dry run takes every step's code path on CPU and reports the GPU-only numbers as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench/gpu_check.py` puts bench/ first on sys.path (bench/kernels.py would shadow the
# kernels package): the repository root goes first instead.
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
    os.path.abspath(__file__))]

STEPS = {  # name -> seconds allowed on the device (the dry run gets the same)
    "versions": 30, "kernel_tests": 150, "parity": 90, "engine": 180, "attention": 60,
    "kernel_bench": 90}
COPY_TBPS = 4.3  # measured device-to-device copy bandwidth of the lent H200 (KINDS.md)
SKIP = "skipped (needs CUDA)"


# ---- the child: one step ---------------------------------------------------------------------
def _device(dry: bool):
    import torch

    return torch.device("cpu" if dry else "cuda")


def _model_shape(dry: bool) -> dict:
    """SmolLM2-135M's shape on the device; a tiny Llama in the dry run."""
    if dry:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    return dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)


def build_checkpoint(dry: bool, path: str) -> str:
    """A random-weight Llama checkpoint of the model's shape (safetensors + config)."""
    import torch
    import transformers

    # initializer_range 0.1, not 0.02: peaked logits, so greedy parity is not decided by ties
    cfg = transformers.LlamaConfig(max_position_embeddings=16384, rms_norm_eps=1e-5,
                                   initializer_range=0.1,
                                   rope_theta=100000.0, tie_word_embeddings=True,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                   **_model_shape(dry))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path)
    return path


def _llm(dry: bool, model: str, **kw):
    from engine import LLM

    _collect()  # the previous engine's pool, before this one measures free memory
    kw.setdefault("dtype", "float32" if dry else "bfloat16")
    kw.setdefault("attention_backend", "triton")
    if dry:
        kw.setdefault("num_kv_blocks", 256)
    return LLM(model, skip_tokenizer_init=True, device="cpu" if dry else "cuda", **kw)


def step_versions(dry: bool, out: dict, model: str) -> None:
    import platform

    import torch
    import transformers
    import triton

    out.update(python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__,
               interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    if dry:
        out["device"] = SKIP
        return
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    out.update(device=props.name, sms=props.multi_processor_count,
               capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
               free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1))


def step_kernel_tests(dry: bool, out: dict, model: str) -> None:
    runs = [["tests/test_kernels.py", "tests/test_fused_kernels.py"]]
    if dry:  # the interpreter is slow: a slice of each file proves the path
        runs[0] += ["-k", "split_kv_decode_padding or add_rms_norm or store_kv_matches"]
    else:
        import importlib.util

        import torch

        if importlib.util.find_spec("xdist"):  # a hundred-odd variants to compile: 8 at once
            runs[0] += ["-n", "8"]
        if torch.cuda.device_count() >= 2:  # tensor parallelism over NCCL where it can run
            runs.append(["tests/test_tp.py", "-k", "not ray and (tp2_equals_tp1 or collectives)"])
    summaries, failed = [], False
    for extra in runs:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                              + extra, cwd=ROOT, capture_output=True, text=True,
                              timeout=STEPS["kernel_tests"] - 10)
        tail = [ln for ln in proc.stdout.splitlines() if " passed" in ln or " failed" in ln]
        summaries.append(tail[-1].strip("= ") if tail else proc.stdout[-300:])
        if proc.returncode:
            failed = True
            out.setdefault("output_tail", []).append((proc.stdout + proc.stderr)[-3000:])
    out.update(summary="; ".join(summaries))
    if failed:
        raise RuntimeError(f"pytest failed: {out['summary']}")


def _prompts(n, length, vocab, seed):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length + 5 * i)] for i in range(n)]


def step_parity(dry: bool, out: dict, model: str) -> None:
    from engine import SamplingParams

    vocab = _model_shape(dry)["vocab_size"]
    batch = _prompts(8, 12 if dry else 40, vocab, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=6 if dry else 24, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        llm = _llm(dry, model, dtype="float32", attention_backend=backend,
                   gpu_memory_utilization=0.3)
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        results[backend] = [o.outputs[0].token_ids for o in outs]
        llm.shutdown()
        del llm, outs
    pairs = list(zip(results["torch"], results["triton"]))
    same = sum(a == b for a, b in pairs)
    out.update(sequences=len(batch), equal=same, tokens_each=params.max_tokens)
    if same != len(batch):
        out["first_divergence"] = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                                   for a, b in pairs if a != b]
        raise RuntimeError(f"greedy tokens differ in {len(batch) - same} of {len(batch)}")


def _collect() -> None:
    """Free dropped engines' KV pools and graphs before the next one profiles free memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _decode_steady(llm, batch: int, prompt_len: int, vocab: int):
    """Put `batch` requests in steady decode (prefill done); returns the engine."""
    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, prompt_len, vocab, seed=batch)):
        engine.add_request(f"d{batch}-{i}", {"prompt_token_ids": p[:prompt_len]}, params)
    for _ in range(64):
        engine.step()
        sched = engine.scheduler
        if all(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running) \
                and not sched.waiting:
            break
    return engine


def _abort_all(engine) -> None:
    sched = engine.scheduler
    engine.abort_request({r.parent_id for r in list(sched.running) + list(sched.waiting)})
    engine.step()
    if engine.has_unfinished_requests():
        raise RuntimeError("requests left after aborting them all")


def _time_decode(dry: bool, engine, steps: int) -> dict:
    """Wall ms per engine.step() and device ms of the model part (graph replay or eager
    forward) by CUDA events; the difference is host time on the critical path."""
    import torch

    runner = engine.runner
    device_ms = []
    if not dry:
        starts, ends = [], []
        originals = dict(runner._graphs)

        class Timed:  # wraps a captured graph: events around replay()
            def __init__(self, graph):
                self.graph = graph

            def replay(self):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                self.graph.replay()
                e.record()
                starts.append(s)
                ends.append(e)
        runner._graphs = {bs: (Timed(g), o) for bs, (g, o) in originals.items()}
        hooks = []
        if not originals:  # eager: events around the model's forward
            pending = []

            def pre(_m, _a):
                s = torch.cuda.Event(enable_timing=True)
                s.record()
                pending.append(s)

            def post(_m, _a, _o):
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                starts.append(pending.pop())
                ends.append(e)
            hooks = [runner.model.register_forward_pre_hook(pre),
                     runner.model.register_forward_hook(post)]
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        if not dry:
            torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
    if not dry:
        runner._graphs = originals
        for h in hooks:
            h.remove()
        device_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    med = lambda xs: round(sorted(xs)[len(xs) // 2], 3) if xs else None  # noqa: E731
    return {"wall_ms": med(wall), "device_ms": med(device_ms) if not dry else SKIP,
            "steps": steps}


def _kernel_launches(dry: bool, engine, layers: int) -> dict:
    """Kernels one decode step launches: the profiler's device events on CUDA, the launcher
    instrumentation (kernels/launch_count.py) in the dry run."""
    if dry:
        from kernels.launch_count import count_launches

        with count_launches() as c, c.scoped({f"layer{i}": m for i, m in
                                              enumerate(engine.runner.model.model.layers)}):
            engine.step()
        per = c.per_scope()
        in_layers = sum(n for s, n in per.items() if s.startswith("layer"))
        return {"per_step": sum(per.values()), "per_layer": in_layers / layers,
                "how": "launcher instrumentation (CPU)"}
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine.step()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = {}
    for e in kernels:
        names[e.name] = names.get(e.name, 0) + 1
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    # the profiler cannot tell layers apart: the step's kernels (sampler included) / layers
    return {"per_step": len(kernels), "approx_per_layer": round(len(kernels) / layers, 2),
            "how": "torch.profiler device events", "top": top}


def _triton_variants() -> int | None:
    """Compiled variants across every Triton kernel of ours (None in the interpreter)."""
    import importlib

    total = 0
    for mod in ("kernels.paged_attention", "kernels.kv_store", "kernels.fused"):
        m = importlib.import_module(mod)
        for obj in vars(m).values():
            if type(obj).__name__ == "InterpretedFunction":
                return None
            caches = getattr(obj, "device_caches", None)  # JITFunction: device -> (cache, ...)
            for entry in (caches or {}).values():
                total += len(entry[0]) if isinstance(entry, tuple) else len(entry)
    return total


def _host_syncs(dry: bool, engine, steps: int):
    if dry:
        return SKIP
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return {"per_step": round(len(syncs) / steps, 2), "first": syncs[:3]}


def step_engine(dry: bool, out: dict, model: str) -> None:
    import torch

    shape = _model_shape(dry)
    vocab, layers = shape["vocab_size"], shape["num_hidden_layers"]
    free_before = None if dry else torch.cuda.mem_get_info()[0]
    llm = _llm(dry, model, max_num_seqs=64, gpu_memory_utilization=0.5,
               max_model_len=4096 if not dry else 512)
    runner = llm.engine.runner
    kv = {"num_blocks": runner.num_blocks, "bytes_per_block": runner.bytes_per_block}
    if not dry:
        free, total = torch.cuda.mem_get_info()
        kv.update(free_before_gib=round(free_before / 2**30, 2),
                  free_after_gib=round(free / 2**30, 2), total_gib=round(total / 2**30, 2),
                  kv_gib=round(runner.num_blocks * runner.bytes_per_block / 2**30, 2),
                  reserved_gib=round(torch.cuda.memory_reserved() / 2**30, 2))
    out["kv_budget"] = kv
    out["graph_sizes"] = SKIP if dry else {"decode_batch": sorted(runner._graphs),
                                           "mixed_tokens": sorted(runner._mixed_graphs)}
    out["decode"] = {}
    for batch in ((1, 4) if dry else (1, 64)):
        engine = _decode_steady(llm, batch, 32 if dry else 128, vocab)
        variants_before = _triton_variants()
        timing = _time_decode(dry, engine, 3 if dry else 30)
        variants_after = _triton_variants()
        timing["new_triton_variants"] = (SKIP if variants_before is None
                                         else variants_after - variants_before)
        out["decode"][f"graph_b{batch}"] = timing
        if batch == (4 if dry else 64):
            out["host_syncs"] = _host_syncs(dry, engine, 5)
        _abort_all(engine)
    llm.shutdown()
    del llm, runner, engine
    eager = _llm(dry, model, max_num_seqs=64, gpu_memory_utilization=0.5, enforce_eager=True,
                 max_model_len=4096 if not dry else 512)
    for batch in ((1,) if dry else (1, 64)):
        engine = _decode_steady(eager, batch, 32 if dry else 128, vocab)
        out["decode"][f"eager_b{batch}"] = _time_decode(dry, engine, 3 if dry else 20)
        if batch == 1:  # eager: every kernel a graph would hold is a separate launch here
            out["launches"] = _kernel_launches(dry, engine, layers)
        _abort_all(engine)
    eager.shutdown()


def step_attention(dry: bool, out: dict, model: str) -> None:
    import torch

    from bench.kernels import bench, make_paged
    from kernels.paged_attention import decode_num_splits, paged_attention

    device = _device(dry)
    dtype = torch.float32 if dry else torch.bfloat16
    heads, kvh, head_dim, block_size = 9, 3, 64, 16
    shapes = [(1, 300), (4, 64)] if dry else [(1, 8192), (64, 1024)]
    rows = []
    for batch, ctx in shapes:
        p = make_paged([ctx] * batch, [1] * batch, kvh, head_dim, block_size, dtype, device)
        q = torch.randn(batch, heads, head_dim, device=device).to(dtype)
        kv_bytes = 2 * batch * ctx * kvh * head_dim * q.element_size()
        for splits in sorted({1, decode_num_splits(batch, kvh, device)}):
            fn = lambda s=splits: paged_attention(  # noqa: E731
                q, p["key_cache"], p["value_cache"], p["qsl_t"], p["lens_t"], p["tables"],
                head_dim ** -0.5, num_splits=s)
            ms = bench(fn, device, reps=1 if dry else 20)
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            rows.append({"batch": batch, "context": ctx, "splits": splits,
                         "us": round(ms * 1e3, 1),
                         "GB/s": SKIP if dry else round(gbs, 1),
                         "of_copy_bw": SKIP if dry else f"{gbs / (COPY_TBPS * 1e3):.1%}"})
    out["rows"] = rows


def step_kernel_bench(dry: bool, out: dict, model: str) -> None:
    args = [sys.executable, os.path.join(ROOT, "bench", "kernels.py"),
            "--dtype", "float32" if dry else "bfloat16"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          timeout=STEPS["kernel_bench"] - 10)
    out["rows"] = [ln for ln in proc.stdout.splitlines() if ln.startswith(
        ("decode", "prefill", "kv_store"))]
    if proc.returncode:
        out["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"bench/kernels.py exited {proc.returncode}")


def run_step(name: str, dry: bool, out_dir: str, model: str) -> int:
    result: dict = {"step": name, "status": "FAIL"}
    t = time.time()
    try:
        globals()[f"step_{name}"](dry, result, model)
        result["status"] = "PASS"
    except Exception as e:  # noqa: BLE001 - a step's failure is its result
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["seconds"] = round(time.time() - t, 1)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:  # the parent's work folder
        json.dump(result, f, indent=1, default=str)
    return 0 if result["status"] == "PASS" else 1


# ---- the parent: every step in a child, then the summary ----------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for logs, JSON and the summary")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every step on CPU in the Triton interpreter with a tiny model")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset")
    ap.add_argument("--step", help=argparse.SUPPRESS)   # child mode
    ap.add_argument("--model", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.step:
        return run_step(args.step, args.cpu_dry_run, args.out, args.model)

    steps = args.steps.split(",")
    for name in steps:
        if name not in STEPS:
            ap.error(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
    start = time.time()
    if args.cpu_dry_run:  # the CPU steps use the C++ ops: build them (minutes, the first
        # time) here, not inside a step's time limit, where a killed build would be lost
        from kernels import cpu_ops

        cpu_ops.available()
    work = tempfile.mkdtemp(prefix="kvserve-gpu-check-")
    model = build_checkpoint(args.cpu_dry_run, os.path.join(work, "model"))
    results = []
    log_path = os.path.join(args.out, "steps.log")
    open(log_path, "w").close()
    for name in steps:
        left = args.budget - (time.time() - start)
        limit = min(STEPS[name], left - 5)
        if limit < 10:
            results.append({"step": name, "status": "SKIP", "error": "out of time budget"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--out", work,
               "--model", model] + (["--cpu-dry-run"] if args.cpu_dry_run else [])
        t = time.time()
        with open(log_path, "a") as log:
            log.write(f"\n==== {name} (limit {limit:.0f}s) ====\n")
            log.flush()
            try:
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT)
            except subprocess.TimeoutExpired:
                log.write(f"\n==== {name}: killed at its limit ====\n")
        path = os.path.join(work, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            results.append({"step": name, "status": "FAIL", "seconds": round(time.time() - t, 1),
                            "error": f"no result (timeout {limit:.0f}s or crash; see steps.log)"})
        print(f"{name:<13} {results[-1]['status']:<5} {time.time() - t:6.1f}s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    summary = {"dry_run": args.cpu_dry_run, "seconds": round(time.time() - start, 1),
               "steps": results}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    table = summary_table(results)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    return 0 if all(r["status"] == "PASS" for r in results) else 1


def _brief(r: dict) -> str:
    if r["status"] != "PASS":
        return r.get("error", "")[:200]
    keys = [k for k in r if k not in ("step", "status", "seconds", "traceback")]
    return "; ".join(f"{k}={json.dumps(r[k], default=str)}" for k in keys)[:900]


def summary_table(results: list[dict]) -> str:
    lines = ["| step | status | seconds | result |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '-')} | "
                     f"{_brief(r).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
