"""Per-request sampling settings, validated on construction (vLLM-shaped).

Every front end (OpenAI, Triton, the batch runner, ``LLM``) builds one of these, so the rules
for what a client may ask live here, once. Numbers must be finite and within the bounds
below; anything that only the loaded model can judge (``top_k`` against the vocabulary) is
checked by ``LLMEngine.check_params``. Bounds that a hostile request would otherwise turn
into work for every sequence on the server (``n``, stop strings) are capped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .structured_outputs import StructuredOutputsParams

MAX_N = 128  # OpenAI's bound on `n`
MAX_LOGPROBS = 20  # OpenAI's bound on `logprobs` / `top_logprobs`
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
MAX_TEMPERATURE = 100.0
# Below this a temperature is greedy: dividing fp32 logits by it would overflow (1e-50 is
# 0.0 in fp32) long before the draw could differ from the argmax. vLLM uses the same 1e-5.
GREEDY_TEMPERATURE = 1e-5
REPETITION_PENALTY_RANGE = (0.01, 100.0)
INT64_MAX = 2**63 - 1
# torch.Generator.manual_seed takes any value in [-2^63, 2^64 - 1]; child i of a request
# is seeded with seed + i, so every derived seed must stay inside that range too.
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (plus the sampled one)
    # top-N logprobs at every prompt position (plus the prompt token's own); vLLM's field.
    # The first child of such a request computes its whole prompt (no prefix-cache hits).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The output must match this (JSON schema, JSON object, regex, choice or Lark grammar);
    # a dict is read as vLLM's structured_outputs field.
    structured_outputs: StructuredOutputsParams | dict | None = None
    # token id -> added to its logit before sampling (OpenAI: -100 bans, +100 forces)
    logit_bias: dict[int, float] | None = None
    _stop: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_ints()
        self._check_numbers()
        if self.top_k == 0:
            self.top_k = -1
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens}).")
        if self.seed is not None and self.seed + self.n - 1 > SEED_RANGE[1]:
            raise ValueError(f"seed + n - 1 must be at most {SEED_RANGE[1]} (each of the n "
                             f"completions is seeded with seed + its index), got {self.seed}.")
        self._stop = self._check_stop()
        self.stop_token_ids = self._check_stop_token_ids()
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self.logit_bias = self._check_logit_bias()

    def _check_ints(self) -> None:
        bounds = {  # name: (lowest, highest, may be None)
            "n": (1, MAX_N, False), "top_k": (-1, INT64_MAX, False),
            "min_tokens": (0, INT64_MAX, False), "max_tokens": (1, INT64_MAX, True),
            "logprobs": (0, MAX_LOGPROBS, True), "seed": (*SEED_RANGE, True),
            "prompt_logprobs": (0, MAX_LOGPROBS, True),
        }
        for name, (lo, hi, optional) in bounds.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _is_int(value):
                kind = "an integer or None" if optional else "an integer"
                raise ValueError(f"{name} must be {kind}, got {value!r:.80}.")
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}.")

    def _check_numbers(self) -> None:
        lo_rep, hi_rep = REPETITION_PENALTY_RANGE
        bounds = {  # name: (lowest, highest, lowest excluded)
            "temperature": (0.0, MAX_TEMPERATURE, False), "top_p": (0.0, 1.0, True),
            "min_p": (0.0, 1.0, False), "repetition_penalty": (lo_rep, hi_rep, False),
            "presence_penalty": (-2.0, 2.0, False), "frequency_penalty": (-2.0, 2.0, False),
        }
        for name, (lo, hi, open_lo) in bounds.items():
            value = _finite_float(name, getattr(self, name))
            if not (lo < value if open_lo else lo <= value) or value > hi:
                interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
                raise ValueError(f"{name} must be in {interval}, got {value:g}.")
            setattr(self, name, value)

    def _check_stop(self) -> list[str]:
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r:.80}.")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings.")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}.")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty.")
        longest = max((len(s) for s in stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters "
                             f"long, got one of {longest}.")
        return stop

    def _check_stop_token_ids(self) -> list[int]:
        ids = self.stop_token_ids
        if ids is not None and not isinstance(ids, (list, tuple)):
            raise ValueError("stop_token_ids must be a list of integers.")
        ids = list(ids or [])
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(ids)}.")
        if not all(_is_int(t) for t in ids):
            raise ValueError("stop_token_ids must be a list of integers.")
        if any(not 0 <= t <= INT64_MAX for t in ids):
            raise ValueError("stop_token_ids must be non-negative token ids.")
        return ids

    def _check_logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must map token ids to numbers.")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, "
                             f"got {len(self.logit_bias)}.")
        lo, hi = LOGIT_BIAS_RANGE
        out = {}
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or not 0 <= token <= INT64_MAX:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r:.40}.")
            value = _finite_float("logit_bias", bias)
            if not lo <= value <= hi:
                raise ValueError(f"logit_bias values must be in [{lo:g}, {hi:g}], got {value:g}.")
            out[token] = value
        return out or None

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_float(name: str, value) -> float:
    """value as a finite float, or a ValueError naming the field (never OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r:.80}.")
    try:
        number = float(value)  # an int past ~1e308 raises OverflowError here
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r:.80}.")
    return number
