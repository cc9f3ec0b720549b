"""Continuous batching under a token budget: plain Python, no torch.

Each step: running requests first (a decode is 1 token, an unfinished prefill gets its next
chunk), then waiting ones in arrival order, each given min(remaining tokens, budget left).
When the pool is out of blocks for a running request, the newest running request is
preempted (blocks freed, recomputed later from its prompt + output so far).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache_manager import KVCacheManager
from .lora import LoRASlots
from .request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens computed for it this step, from request.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a token is sampled."""
        req = self.request
        return req.num_computed_tokens + self.num_tokens == req.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class WaitingQueue:
    """FIFO of waiting requests whose ``remove`` is O(1): aborting all n children of a
    large-n request must not cost O(n^2). A removed request's entry is only marked dead and
    dropped once it reaches the head (or when dead entries outnumber live ones)."""

    def __init__(self) -> None:
        self._entries: deque[list] = deque()  # [request, alive]
        self._live: dict[int, list] = {}  # id(request) -> its live entry

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, req: Request) -> bool:
        return id(req) in self._live

    def __iter__(self):
        return (e[0] for e in list(self._entries) if e[1])

    def append(self, req: Request) -> None:
        self._add(req, self._entries.append)

    def appendleft(self, req: Request) -> None:
        self._add(req, self._entries.appendleft)

    def _add(self, req: Request, push) -> None:
        if id(req) in self._live:
            raise ValueError(f"{req.request_id!r} is already waiting.")
        entry = [req, True]
        self._live[id(req)] = entry
        push(entry)

    def peek(self) -> Request:
        self._drop_dead_head()
        return self._entries[0][0]

    def popleft(self) -> Request:
        self._drop_dead_head()
        req = self._entries.popleft()[0]
        del self._live[id(req)]
        return req

    def remove(self, req: Request) -> None:
        self._live.pop(id(req))[1] = False
        if len(self._entries) > 64 and len(self._entries) > 2 * len(self._live):
            self._entries = deque(e for e in self._entries if e[1])

    def _drop_dead_head(self) -> None:
        while self._entries and not self._entries[0][1]:
            self._entries.popleft()


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, watermark: float = 0.01,
                 lora_slots: LoRASlots | None = None) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Admission keeps this many blocks spare so new arrivals do not immediately
        # force preemption of the requests already running.
        self.watermark_blocks = int(watermark * kv_cache.pool.num_blocks)
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # LoRA: every running request holds its adapter's slot, so a step never mixes more
        # adapters than there are slots.
        self.lora_slots = lora_slots

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use.")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # memory is tight: let the running ones drain first
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv_cache.allocate_slots(req, num_new):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        no_slot: list[Request] = []  # wait for an adapter slot without holding up the rest
        try:
            self._admit(out, budget, no_slot)
        finally:
            for req in reversed(no_slot):  # back at the head, in their order
                self.waiting.appendleft(req)

    def _admit(self, out: SchedulerOutput, budget: int, no_slot: list[Request]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.peek()
            if not self._acquire_lora(req):
                no_slot.append(self.waiting.popleft())
                continue
            # prompt_logprobs need every prompt position computed: no prefix-cache hits
            hits, num_hit_tokens = (([], 0) if req.needs_prompt_logprobs
                                    else self.kv_cache.get_computed_blocks(req))
            num_new = min(req.num_tokens - num_hit_tokens, budget)
            # Hits still referenced by others cost nothing; unreferenced hits leave the free queue.
            num_blocks_needed = (-(-(num_hit_tokens + num_new) // self.kv_cache.block_size)
                                 - len(hits) + sum(1 for b in hits if b.ref_cnt == 0))
            if (self.running and self.kv_cache.num_free_blocks - num_blocks_needed
                    < self.watermark_blocks) or not self.kv_cache.allocate_slots(
                    req, num_new, hits):
                self._release_lora(req)
                break  # FCFS: nobody overtakes the head of the queue for memory
            self.waiting.popleft()
            req.num_computed_tokens = num_hit_tokens
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit_tokens
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new

    def _acquire_lora(self, req: Request) -> bool:
        if req.lora_key is None or req.lora_slot is not None:
            return True
        req.lora_slot = self.lora_slots.acquire(req.lora_key)
        return req.lora_slot is not None

    def _release_lora(self, req: Request) -> None:
        if req.lora_slot is not None:
            self.lora_slots.release(req.lora_slot)
            req.lora_slot = None

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req)
        self._release_lora(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput,
                           sampled: dict[str, int]) -> list[Request]:
        """Advance every scheduled request by its chunk; append sampled tokens.

        Returns the requests that got a new token. Those whose token ends them
        (eos, stop token, length) are finished and their blocks freed here.
        """
        updated = []
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_tokens
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.append_token(token)
            updated.append(req)
            if req.check_stop():
                self._free(req)
        return updated

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request from outside (stop string, abort); unknown or finished ids are a no-op."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        req.status = status
        self._free(req)
        return req

    def _free(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:  # at most max_num_seqs long
            self.running.remove(req)
        self.kv_cache.free(req)
        self._release_lora(req)
        del self.requests[req.request_id]
