"""vLLM's offline ``LLM.generate`` on the requests ``bench/throughput.py --baseline vllm``
wrote: run with the python of a venv that has vLLM (its torch pin is its own, so it lives
apart from kvserve's). Writes {"seconds", "vllm_version"} as JSON to the output path.

    /path/to/vllm-venv/bin/python bench/vllm_baseline.py requests.json result.json
"""
from __future__ import annotations

import json
import os
import sys
import time

# bench/ holds scripts, not modules: off sys.path, so bench/kernels.py cannot shadow the
# `kernels` package that vLLM's dependencies import.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    requests = spec["requests"]
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              seed=0, **spec.get("engine_args", {}))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, as for kvserve
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == n for o, (_, n) in zip(outs, requests))
    with open(out_path, "w") as f:
        json.dump({"seconds": elapsed, "vllm_version": vllm.__version__}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
