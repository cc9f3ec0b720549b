"""LLMEngine: add_request / step / abort. One step = schedule -> run -> sample -> update.

A request asking for n completions becomes n child requests; the first child's full
prompt blocks go into the prefix cache as it is scheduled, so the others share them.

A request that makes a step fail (a bug in preparing or sampling it) fails alone: the step
is re-run in halves, in schedule order, until the failing requests are found; they end with
finish_reason "error" and their blocks are freed, and the others' outputs are what they
would have been (seeded generators are rewound before each re-run). Only an
``EngineFatalError`` escapes ``step``.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import torch

from .core import faults
from .core.config import EngineConfig, resolve_model_dir
from .core.kv_cache_manager import KVCacheManager
from .core.lora import LoRARequest, LoRASlots
from .core.request import Request, RequestStatus
from .core.sampling_params import SamplingParams
from .core.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from .detokenizer import IncrementalDetokenizer
from .model_executor.model_config import ModelConfig
from .model_executor.model_runner import ModelRunner
from .outputs import CompletionOutput, Logprob, RequestOutput
from .structured_output.grammar import GrammarCompiler, new_matcher
from .tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    logprobs: list[list] = field(default_factory=list)
    prompt_logprobs: list | None = None  # vLLM's shape, once the prompt is computed


@dataclass
class _PendingGrammar:
    """A constrained request whose grammar is still compiling: not yet scheduled."""
    parent: _Parent
    future: concurrent.futures.Future
    deadline: float


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
        self.workers = None
        if config.tensor_parallel_size > 1:
            from .distributed.tp import Shards
            from .distributed.workers import start_workers

            cfg = self.model_config  # a shape that does not split fails here, before spawning
            Shards(0, config.tensor_parallel_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size)
            self.workers = start_workers(config, model_dir)
        try:
            self.runner = ModelRunner(config, self.model_config, model_dir,
                                      self.workers and self.workers.tp, self.workers)
            num_blocks = self.runner.allocate_kv_cache()
        except BaseException:
            if self.workers is not None:
                self.workers.shutdown()
            raise
        self.max_model_len = self._max_model_len(num_blocks)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   lora_slots=LoRASlots(config.max_loras) if config.enable_lora
                                   else None)
        self.max_prompt_chars = self._max_prompt_chars()
        self.parents: dict[str, _Parent] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.errors: dict[str, str] = {}  # parent id -> why it failed, until reported
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                        self.eos_token_ids)
        self.pending_grammars: dict[str, _PendingGrammar] = {}

    def _max_prompt_chars(self) -> int | None:
        """Characters a text prompt may have, checked before tokenizing it. By default the
        most that max_model_len tokens can spell (no token decodes to more characters than
        its vocabulary entry has), so no prompt that fits is ever refused by it."""
        if self.config.max_prompt_chars is not None:
            return self.config.max_prompt_chars
        if self.tokenizer is None:
            return None
        longest = max((len(piece) for piece in self.tokenizer.get_vocab()), default=1)
        return self.max_model_len * max(longest, 1)

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
            self.check_prompt_chars(len(prompt))
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

    def check_prompt_chars(self, num_chars: int) -> None:
        """Refuse text too long to fit max_model_len before spending time tokenizing it."""
        if self.max_prompt_chars is not None and num_chars > self.max_prompt_chars:
            raise ValueError(f"prompt is {num_chars} characters, more than this engine takes "
                             f"(max_prompt_chars={self.max_prompt_chars}).")

    def check_params(self, params: SamplingParams) -> None:
        """What only the loaded model can judge about SamplingParams (the rest is checked
        when they are built)."""
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams.")
        vocab = self.model_config.vocab_size
        if params.top_k > vocab:
            raise ValueError(f"top_k must be at most the vocabulary size ({vocab}), "
                             f"got {params.top_k}.")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias holds token ids outside the vocabulary [0, {vocab}).")
        if params.structured_outputs is not None and self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer (skip_tokenizer_init=True).")

    def check_structured(self, params: SamplingParams) -> None:
        """Compile the request's grammar now (cached for when it is added): ValueError if
        it cannot be enforced. Blocks for the compile; servers wait for
        ``grammars.submit`` on their event loop instead."""
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

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

    def resolve_lora(self, lora_request: LoRARequest | None) -> str | None:
        """The adapter's key, loaded and checked; ValueError naming it if it cannot be
        served (or LoRA is off)."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError("lora_request must be a LoRARequest.")
        if self.runner.lora is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but this "
                             f"engine was started without enable_lora=True.")
        return self.runner.lora.resolve(lora_request.lora_name, lora_request.lora_path)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        params = SamplingParams() if params is None else params
        self.check_params(params)
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        text, ids = self.tokenize(prompt)
        self.validate_prompt(ids)
        lora_key = self.resolve_lora(lora_request)
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            child = Request(child_id, ids, params, self.eos_token_ids, self.max_model_len,
                            arrival_time, index=i, parent_id=request_id)
            if lora_key is not None:
                child.lora_key, child.lora_name = lora_key, lora_request.lora_name
            children.append(child)
            if child_id in self.scheduler.requests:
                raise ValueError(f"request_id {child_id!r} is already in use.")
        # Everything that can fail is done before anything is registered: a request that
        # raises here leaves no trace (no orphan to keep the loop busy).
        detoks = {}
        if self.tokenizer is not None:
            detoks = {r.request_id: IncrementalDetokenizer(self.tokenizer, r) for r in children}
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammars.submit(params.structured_outputs)
        for req in children:
            self.runner.add_generator(req)
        parent = _Parent(request_id, text, ids, children, [[] for _ in range(params.n)])
        self.parents[request_id] = parent
        self.detokenizers.update(detoks)
        if grammar is not None:  # scheduled once its grammar has compiled (see step)
            self.pending_grammars[request_id] = _PendingGrammar(
                parent, grammar, time.monotonic() + self.config.grammar_compile_timeout)
            return
        for req in children:
            self.scheduler.add_request(req)

    def abort_request(self, request_ids) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            parent = self.parents.pop(rid, None)
            if parent is None:
                continue
            self.pending_grammars.pop(rid, None)
            for req in parent.children:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ABORTED)
                self._drop_child(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        failed_grammars = self._admit_compiled() if self.pending_grammars else []
        sched = self.scheduler.schedule()
        lora_failed = self._load_lora_slots(sched) if self.scheduler.lora_slots else []
        if sched.is_empty:
            if self.pending_grammars and not failed_grammars:  # only compiles: do not spin
                concurrent.futures.wait([p.future for p in self.pending_grammars.values()],
                                        timeout=0.005, return_when="FIRST_COMPLETED")
            return [self._make_output(p) for p in failed_grammars + lora_failed]
        if faults.enabled():
            faults.check("fatal", [s.request for s in sched.scheduled])
        sampled, logprobs, failed = self._execute(sched.scheduled)
        touched: dict[str, _Parent] = {}
        for req, error in failed.items():
            parent = self._fail(req, error)
            if parent is not None:
                touched[parent.request_id] = parent
        if failed:  # the failed requests and their siblings: ended, nothing to update
            sched.scheduled = [s for s in sched.scheduled if not s.request.is_finished]
        for req, lp in logprobs:
            if not req.is_finished:
                self._record_logprobs(req, sampled[req.request_id], lp)
        updated = self.scheduler.update_from_output(sched, sampled)
        for req in updated:
            grammar_done = req.grammar is not None and self._advance_grammar(req)
            if req.status is RequestStatus.FINISHED_ERROR:
                parent = self.parents.get(req.parent_id)
            else:
                self._detokenize(req)
                if grammar_done and not req.is_finished:  # complete: nothing more may follow
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                parent = self.parents.get(req.parent_id)
            if parent is not None:
                touched[parent.request_id] = parent
        for parent in failed_grammars + lora_failed:
            touched[parent.request_id] = parent
        return [self._make_output(p) for p in touched.values()]

    def _load_lora_slots(self, sched) -> list[_Parent]:
        """Write the adapters the scheduler gave slots into them. One that cannot be read
        back (its files changed or went away after it was accepted, and it had left the CPU
        cache) fails the requests using it, not the step. Returns their parents."""
        failed: dict[str, _Parent] = {}
        for slot, key in self.scheduler.lora_slots.take_loads():
            try:
                self.runner.lora.set_slot(slot, key)
            except Exception as e:  # noqa: BLE001 - that adapter's requests, not the engine
                logger.error("loading a LoRA adapter into slot %d failed: %s", slot, e)
                for s in [s for s in sched.scheduled if s.request.lora_key == key]:
                    parent = self._fail(s.request, e)
                    if parent is not None:
                        failed[parent.request_id] = parent
                sched.scheduled = [s for s in sched.scheduled if not s.request.is_finished]
                self.scheduler.lora_slots.forget(key)  # the next request reloads it
        return list(failed.values())

    # ---- structured outputs ------------------------------------------------------------
    def _admit_compiled(self) -> list[_Parent]:
        """Schedule the constrained requests whose grammars are ready (in arrival order);
        fail those whose compile failed or ran past its limit. Returns the failed parents."""
        failed, now = [], time.monotonic()
        for rid, pending in list(self.pending_grammars.items()):
            error = None
            if pending.future.done():
                try:
                    proto = pending.future.result()
                except Exception as e:  # noqa: BLE001 - the request's grammar, not the engine
                    error = str(e)
            elif now > pending.deadline:
                error = (f"compiling the grammar took over {self.config.grammar_compile_timeout}s "
                         "(grammar_compile_timeout)")
            else:
                continue
            del self.pending_grammars[rid]
            if error is not None:
                self.errors[rid] = error
                for child in pending.parent.children:
                    child.status = RequestStatus.FINISHED_ERROR
                failed.append(pending.parent)
                continue
            for child in pending.parent.children:
                child.grammar = new_matcher(proto)
                self.scheduler.add_request(child)
        return failed

    def _advance_grammar(self, req: Request) -> bool:
        """Feed the sampled token to the request's matcher; True once the grammar is
        complete. A token the matcher rejects is a bug: the request fails, loudly."""
        if req.is_finished and req.status is not RequestStatus.FINISHED_LENGTH:
            return False  # eos / stop token: the end the grammar allowed
        token = req.token_ids[-1]
        if not req.grammar.consume_token(token):
            error = RuntimeError(f"the grammar rejected sampled token {token}: "
                                 f"{req.grammar.get_error()}")
            logger.error("request %s: %s", req.request_id, error)
            self._fail(req, error)
            return False
        return req.grammar.is_stopped()

    def _execute(self, scheduled: list[ScheduledRequest]):
        """Run the model for ``scheduled``: (sampled tokens by id, [(request, logprobs)],
        {request: error} for the requests that could not be run)."""
        # Only rows that draw this step move a generator (greedy rows and unfinished prefill
        # chunks do not): snapshot just those, a few microseconds each.
        rewind = self.runner.generator_states(
            [s.request for s in scheduled if s.samples and not s.request.sampling_params.greedy])
        try:
            reqs, out, prompt_lps = self.runner.execute(SchedulerOutput(scheduled), self.kv_cache)
        except faults.EngineFatalError:
            raise
        except Exception as e:  # noqa: BLE001 - isolate the request(s) that caused it
            # (under TP a failure inside the forward pass is already an EngineFatalError: the
            # ranks may be between collectives; one after it, in sampling, is not)
            if len(scheduled) == 1:
                logger.exception("request %s failed inside a step", scheduled[0].request.request_id)
                return {}, [], {scheduled[0].request: e}
            self.runner.set_generator_states(rewind)
            # In schedule order: a request may read blocks that an earlier one of this step
            # publishes and writes, so the earlier half always runs first.
            mid = len(scheduled) // 2
            first, second = self._execute(scheduled[:mid]), self._execute(scheduled[mid:])
            return ({**first[0], **second[0]}, first[1] + second[1], {**first[2], **second[2]})
        for s in scheduled:  # recorded here: a re-run half computes its own again
            s.request.prompt_logprobs.extend(prompt_lps.get(s.request.request_id, ()))
        if out is None:
            return {}, [], {}
        sampled = {r.request_id: t for r, t in zip(reqs, out.token_ids)}
        logprobs = [(r, lp) for r, lp in zip(reqs, out.logprobs) if lp is not None]
        return sampled, logprobs, {}

    def _fail(self, req: Request, error: Exception) -> _Parent | None:
        """End the failed request's whole parent (every sibling) with finish_reason "error"."""
        parent = self.parents.get(req.parent_id)
        if parent is None:
            return None
        self.errors[parent.request_id] = f"{type(error).__name__}: {error}"
        for child in parent.children:
            blocks = self.kv_cache.blocks(child.request_id)
            self.scheduler.finish_request(child.request_id, RequestStatus.FINISHED_ERROR)
            # Its K/V may never have been written: keep it out of the prefix cache.
            self.kv_cache.pool.uncache_unreferenced(blocks)
            child.status = RequestStatus.FINISHED_ERROR
        return parent

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
        error = None
        if finished:
            self.parents.pop(parent.request_id, None)
            error = self.errors.pop(parent.request_id, None)
            for req in parent.children:
                self._drop_child(req)
        first = parent.children[0]
        if (first.sampling_params.prompt_logprobs is not None and parent.prompt_logprobs is None
                and not first.needs_prompt_logprobs):
            parent.prompt_logprobs = self._prompt_logprob_entries(first)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs,
                             finished, first.num_cached_tokens, first.arrival_time,
                             first.first_scheduled_time, error, parent.prompt_logprobs)

    def _prompt_logprob_entries(self, req: Request) -> list:
        """[None, {token: Logprob}, ...]: one entry per prompt token, the first has none."""
        entries: list = [None]
        for token, (chosen, rank, top_ids, top_vals) in zip(req.prompt_token_ids[1:],
                                                            req.prompt_logprobs):
            entry = {token: Logprob(chosen, rank, self._token_text(token))}
            for r, (tid, val) in enumerate(zip(top_ids, top_vals), start=1):
                entry.setdefault(tid, Logprob(val, r, self._token_text(tid)))
            entries.append(entry)
        return entries

    def _drop_child(self, req: Request) -> None:
        self.detokenizers.pop(req.request_id, None)
        self.runner.drop_request(req.request_id)

    # ---- introspection -----------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """{"weights", "kv_cache"}: bytes this engine holds on its device."""
        return self.runner.memory_bytes()

    def close(self) -> None:
        """Stop the grammar thread and any tensor-parallel workers; the engine is not used
        after this."""
        self.grammars.close()
        if self.workers is not None:
            self.workers.shutdown()

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
            "lora_slots_in_use": (self.scheduler.lora_slots.in_use
                                  if self.scheduler.lora_slots is not None else 0),
        }
