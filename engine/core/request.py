"""Request state: plain Python, no torch.

One number drives scheduling: ``num_computed_tokens`` chases ``num_tokens``
(prompt + generated so far). A request samples a token only in a step whose
chunk reaches the end of its known tokens.

    |<---------------- num_tokens ---------------->|
    |<-- prompt -->|<-- output -->|
    |<-- num_computed_tokens -->|<- scheduled ->|   (a chunk this step)
"""
from __future__ import annotations

import enum
import time

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # failed inside a step (a bug): the request alone ends

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASON

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        max_model_len: int | None = None,
        arrival_time: float | None = None,
        index: int = 0,
        parent_id: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index  # position among the parent's n completions
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset() if sampling_params.ignore_eos else eos_token_ids
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None  # for queue-time metrics
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids
        # Structured outputs: this sequence's grammar matcher (llguidance), set once its
        # grammar has compiled; it follows committed tokens only, so preemption (which keeps
        # them) never puts it out of step.
        self.grammar = None
        # prompt_logprobs: entry k is for prompt token k + 1 (predicted at position k), as
        # (logprob, rank, top ids, top logprobs); filled as the prefill chunks run
        self.prompt_logprobs: list[tuple] = []
        # LoRA: the adapter's key (a hash of its contents; None = the base model), the slot
        # its weights sit in while the request runs, and its name for outputs and metrics.
        # The key seeds the block hashes: K/V computed under one adapter is never a prefix
        # hit for another.
        self.lora_key: str | None = None
        self.lora_name: str | None = None
        self.lora_slot: int | None = None
        limit = sampling_params.max_tokens
        if max_model_len is not None:
            room = max(max_model_len - self.num_prompt_tokens, 1)
            limit = room if limit is None else min(limit, room)
        self.max_tokens = limit

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions whose logprobs are still owed (the first child only)."""
        return (self.sampling_params.prompt_logprobs is not None and self.index == 0
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def cache_salt(self) -> bytes | None:
        return None if self.lora_key is None else self.lora_key.encode()

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self) -> bool:
        """Set a finished status from the last sampled token; stop strings are the detokenizer's."""
        token = self.token_ids[-1]
        params = self.sampling_params
        if self.num_output_tokens >= params.min_tokens:
            if token in self.eos_token_ids or token in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = None if token in self.eos_token_ids else token
                return True
        if self.max_tokens is not None and self.num_output_tokens >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")
