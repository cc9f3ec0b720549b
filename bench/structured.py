"""What constrained decoding costs, in one run:

1. the grammar mask per constrained row per step: llguidance filling the row's bitmask,
   and applying the masks to the logits (unpack + masked_fill), for a JSON schema;
2. W1-style offline throughput (random-token prompts, greedy, ignore_eos) with none of the
   requests constrained vs half of them, same engine, same prompts, in A B B A order.

    python bench/structured.py --num-prompts 64 --input-len 128 --output-len 128

The constrained half uses a grammar that cannot finish early (a JSON-like array with no
closing bracket), so both runs generate the same number of tokens.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

from bench.common import emit_json, parse_engine_args  # noqa: E402
from engine import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from engine.model_executor.sampler import apply_grammar_masks  # noqa: E402
from engine.structured_output.grammar import new_matcher  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "kind", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}
# JSON-like, never complete: every step stays constrained until max_tokens
ENDLESS = r'''start: "[" item ("," item)*
item: NUMBER | "\"" WORD "\""
NUMBER: /[0-9]{1,6}/
WORD: /[a-z]{1,12}/'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--mask-rows", default="1,8,32", help="rows per mask-cost measurement")
    p.add_argument("--mask-iters", type=int, default=50)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON here too")
    return p.parse_args(argv)


def mask_cost(llm: LLM, rows: int, iters: int) -> dict:
    """ms per step for ``rows`` constrained rows: fill (llguidance) and apply (torch)."""
    import llguidance.torch as llt

    engine = llm.engine
    proto = engine.grammars.compile(StructuredOutputsParams(json=SCHEMA))
    prefix = engine.tokenizer.encode('{"name":"', add_special_tokens=False)
    matchers = []
    for _ in range(rows):  # mid-string: the widest mask, the usual case inside JSON values
        m = new_matcher(proto)
        assert m.consume_tokens(prefix)
        matchers.append(m)
    vocab = engine.model_config.vocab_size
    logits = torch.randn(rows, vocab)
    bitmask = torch.empty((rows, (vocab + 31) // 32), dtype=torch.int32)
    start = time.perf_counter()
    for _ in range(iters):
        for j, m in enumerate(matchers):
            llt.fill_next_token_bitmask(m, bitmask, j)
    fill = (time.perf_counter() - start) / iters
    start = time.perf_counter()
    for _ in range(iters):
        apply_grammar_masks(logits.clone(), matchers, list(range(rows)))
    both = (time.perf_counter() - start) / iters
    return {"rows": rows, "fill_ms_per_row": 1e3 * fill / rows,
            "apply_ms_per_row": 1e3 * max(both - fill, 0.0) / rows,
            "total_ms_per_step": 1e3 * both}


def throughput(llm: LLM, args, constrained_every: int | None) -> float:
    rng = random.Random(args.seed)
    vocab = llm.engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab - 100)
                                     for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    grammar = StructuredOutputsParams(grammar=ENDLESS)
    params = [SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                             structured_outputs=grammar if constrained_every
                             and i % constrained_every == 0 else None)
              for i in range(args.num_prompts)]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up (and the compile)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    return elapsed


def main(argv=None) -> int:
    args = parse_args(argv)
    # No prefix caching: the four runs reuse the same prompts, and later runs would skip
    # the prefill the first one paid for.
    llm = LLM(dtype=args.dtype, **{"enable_prefix_caching": False,
                                   **parse_engine_args(args.engine_arg)})
    result = {"dtype": args.dtype, "threads": torch.get_num_threads(),
              "vocab": llm.engine.model_config.vocab_size,
              "mask": [mask_cost(llm, int(r), args.mask_iters) for r in args.mask_rows.split(",")]}
    n_out = args.num_prompts * args.output_len
    # A B B A: the VM drifts by tens of percent within minutes; each pair shares its drift
    runs = {"none": [], "half": []}
    for label in ("none", "half", "half", "none"):
        runs[label].append(throughput(llm, args, 2 if label == "half" else None))
    plain, half = sum(runs["none"]) / 2, sum(runs["half"]) / 2
    result["w1"] = {"num_prompts": args.num_prompts, "input_len": args.input_len,
                    "output_len": args.output_len, "order": "none, half, half, none",
                    "none_constrained": {"seconds": runs["none"], "output_tok_s": n_out / plain},
                    "half_constrained": {"seconds": runs["half"], "output_tok_s": n_out / half},
                    "slowdown": half / plain}
    emit_json(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
