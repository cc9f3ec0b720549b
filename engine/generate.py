"""Offline generation from the command line: ``python -m engine.generate "prompt" ...``."""
from __future__ import annotations

import argparse
import sys

from .core.sampling_params import SamplingParams
from .llm import LLM


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve generate", description=__doc__)
    p.add_argument("prompts", nargs="+", help="prompts to complete")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: bundled SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    use_chat = not args.raw and getattr(llm.tokenizer, "chat_template", None)
    prompts = [llm.render_chat([{"role": "user", "content": p}]) if use_chat else p
               for p in args.prompts]
    for out in llm.generate(prompts, params, use_tqdm=False):
        print(out.outputs[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
