"""LLMEngine: add_request / step / abort. One step = schedule -> run -> sample -> update.

A request asking for n completions becomes n child requests; the first child's full
prompt blocks go into the prefix cache as it is scheduled, so the others share them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .config import EngineConfig, resolve_model_dir
from .detokenizer import IncrementalDetokenizer
from .kv_cache_manager import KVCacheManager
from .model_config import ModelConfig
from .model_runner import ModelRunner
from .outputs import CompletionOutput, Logprob, RequestOutput
from .request import Request, RequestStatus
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    logprobs: list[list] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_dir = resolve_model_dir(config.model)
        self.model_dir = model_dir
        self.model_config = ModelConfig.from_pretrained(model_dir)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(config.tokenizer or model_dir)
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer)
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.model_config, model_dir)
        num_blocks = self.runner.allocate_kv_cache()
        self.max_model_len = self._max_model_len(num_blocks)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        self.parents: dict[str, _Parent] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    def _max_model_len(self, num_blocks: int) -> int:
        limit = self.config.max_model_len or self.model_config.max_position_embeddings
        capacity = num_blocks * self.config.block_size
        if limit > capacity:
            # A lone request must always fit, or it could wait (or preempt itself) forever.
            logger.warning("max_model_len %d exceeds the KV pool (%d tokens); capping it.",
                           limit, capacity)
            limit = capacity
        return limit

    # ---- requests in -------------------------------------------------------------------
    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """(text, token ids) for a str, a list of ids, or {"prompt_token_ids": [...]}."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True).")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict; got {type(prompt).__name__}.")

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed.")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids holds ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens, more than max_model_len "
                             f"({self.max_model_len}).")

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams.")
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        text, ids = self.tokenize(prompt)
        self.validate_prompt(ids)
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(Request(child_id, ids, params, self.eos_token_ids, self.max_model_len,
                                    arrival_time, index=i, parent_id=request_id))
        self.parents[request_id] = _Parent(request_id, text, ids, children,
                                           [[] for _ in range(params.n)])
        for req in children:
            self.runner.add_generator(req)
            if self.tokenizer is not None:
                self.detokenizers[req.request_id] = IncrementalDetokenizer(self.tokenizer, req)
            self.scheduler.add_request(req)

    def abort_request(self, request_ids) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            parent = self.parents.pop(rid, None)
            if parent is None:
                continue
            for req in parent.children:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ABORTED)
                self._drop_child(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        sampling_reqs, sampler_out = self.runner.execute(sched, self.kv_cache)
        sampled = {}
        if sampler_out is not None:
            sampled = {r.request_id: t for r, t in zip(sampling_reqs, sampler_out.token_ids)}
            for req, lp in zip(sampling_reqs, sampler_out.logprobs):
                if lp is not None:
                    self._record_logprobs(req, sampled[req.request_id], lp)
        updated = self.scheduler.update_from_output(sched, sampled)
        touched: dict[str, _Parent] = {}
        for req in updated:
            self._detokenize(req)
            parent = self.parents.get(req.parent_id)
            if parent is not None:
                touched[parent.request_id] = parent
        return [self._make_output(p) for p in touched.values()]

    def _detokenize(self, req: Request) -> None:
        detok = self.detokenizers.get(req.request_id)
        if detok is None:
            return
        stopped_by_token = req.status is RequestStatus.FINISHED_STOPPED
        if stopped_by_token and not req.sampling_params.include_stop_str_in_output:
            return  # the eos / stop token itself is not part of the text
        stop = detok.add_token(req.token_ids[-1])
        if stop is not None:
            if not req.is_finished:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = stop

    def _record_logprobs(self, req: Request, token: int, lp) -> None:
        parent = self.parents.get(req.parent_id)
        if parent is None:
            return
        chosen, rank, top_ids, top_vals = lp
        entry = {token: Logprob(chosen, rank, self._token_text(token))}
        for r, (tid, val) in enumerate(zip(top_ids, top_vals), start=1):
            entry.setdefault(tid, Logprob(val, r, self._token_text(tid)))
        parent.logprobs[req.index].append(entry)

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outputs = []
        for req in parent.children:
            detok = self.detokenizers.get(req.request_id)
            text = "" if detok is None else detok.stream_text(req.is_finished)
            outputs.append(CompletionOutput(
                index=req.index, text=text, token_ids=req.output_token_ids,
                finish_reason=req.status.finish_reason, stop_reason=req.stop_reason,
                logprobs=parent.logprobs[req.index] if req.sampling_params.logprobs is not None else None))
        finished = all(req.is_finished for req in parent.children)
        if finished:
            self.parents.pop(parent.request_id, None)
            for req in parent.children:
                self._drop_child(req)
        first = parent.children[0]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs,
                             finished, first.num_cached_tokens, first.arrival_time,
                             first.first_scheduled_time)

    def _drop_child(self, req: Request) -> None:
        self.detokenizers.pop(req.request_id, None)
        self.runner.drop_request(req.request_id)

    # ---- introspection -----------------------------------------------------------------
    def get_stats(self) -> dict:
        pool = self.kv_cache.pool
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_blocks": pool.num_blocks,
            "num_free_blocks": pool.num_free_blocks,
            "kv_cache_usage": pool.usage,
            "prefix_cache_queries": pool.num_cache_queries,
            "prefix_cache_hits": pool.num_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }
