"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log probability of one token (from the model's raw distribution), with its rank."""
    logprob: float
    rank: int
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-N).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that matched
    logprobs: SampleLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    arrival_time: float | None = None  # time.monotonic() stamps, for metrics
    first_scheduled_time: float | None = None
    # Set when the request failed inside a step (finish_reason "error"): what went wrong.
    error: str | None = None
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then per token
    # {token id: Logprob} (the prompt token and the top-N), as vLLM
    prompt_logprobs: list | None = None
