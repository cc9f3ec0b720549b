"""LLM: the offline, vLLM-shaped entry point (generate / chat)."""
from __future__ import annotations

import itertools
import sys
import time

from .core.config import EngineConfig
from .core.sampling_params import SamplingParams
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .tokenizer import render_chat


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Free what the engine holds outside this process's memory: tensor-parallel worker
        processes and their ports. (Garbage collection does it too.)"""
        self.engine.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True,
                 lora_request=None) -> list[RequestOutput]:
        """Complete each prompt (str, list of token ids, or {"prompt_token_ids": [...]});
        outputs come back in prompt order. ``lora_request``: one LoRARequest for every
        prompt, or a list with one (or None, the base model) per prompt."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts.")
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora_requests for {len(prompts)} prompts.")
        for p in {id(p): p for p in params}.values():
            self.engine.check_structured(p)  # an unenforceable grammar: ValueError up front
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p, lora_request=lora)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)  # a bad prompt costs the others nothing
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None, lora_request=None) -> list[RequestOutput]:
        """One conversation (list of messages) or several (list of lists), through the
        tokenizer's chat template; ``tools`` (OpenAI function specs) are rendered by it."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        if tools is not None:
            chat_template_kwargs = {**(chat_template_kwargs or {}), "tools": tools}
        prompts = [self.render_chat(c, add_generation_prompt, chat_template_kwargs)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def render_chat(self, messages, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> dict:
        return render_chat(self.engine.tokenizer, messages, add_generation_prompt,
                           chat_template_kwargs, self.engine.max_prompt_chars)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        start, generated = time.perf_counter(), 0
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tok/s")
        except BaseException:
            self.engine.abort_request(list(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="req", file=sys.stderr, dynamic_ncols=True)
