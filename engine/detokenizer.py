"""Incremental detokenization that never emits broken UTF-8, and stop strings.

Each new token decodes a short window (a few tokens of context before the unread ones);
text is released only once it no longer ends in U+FFFD, i.e. once a multi-byte character
split across tokens is complete.

Stop strings are matched by the request's shared ``StopMatcher`` (an Aho-Corasick
automaton, see ``stop_matcher``): each sequence feeds it only its newly released text
and keeps one integer state, so the per-step cost does not depend on how many stop
strings a request has or how long they are. The first stop string to END wins (among
those ending at the same character, the longest); that is what a token-by-token stream
sees first, and it does not depend on how the text was split into tokens. With stops
``["abcd", "bc"]`` the text ``"abcd"`` stops at ``"bc"``. The text is cut at the match
(after it with include_stop_str_in_output, else before it) and is final from then on.
While a request runs, the tail that could still grow into a stop string (the matcher
state's depth) is held back from ``stream_text``.
"""
from __future__ import annotations

from .core.request import Request
from .core.stop_matcher import ROOT, matcher_for

_CONTEXT_TOKENS = 5  # tokens decoded before the unread ones, for correct leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer, req: Request) -> None:
        self.tokenizer = tokenizer
        params = req.sampling_params
        self.skip_special_tokens = params.skip_special_tokens
        self.include_stop = params.include_stop_str_in_output
        self.matcher = matcher_for(params)  # shared by the request's n sequences
        self.stop_state = ROOT
        self.stop_reason: str | None = None
        self.token_ids = list(req.prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - _CONTEXT_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append one token's text; returns the stop string if one now matched (text cut)."""
        if self.stop_reason is not None:
            return None  # the text was cut at a stop string and is final
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return self._check_stop(new)
        return None

    def _check_stop(self, new: str) -> str | None:
        """Feed the newly released text to the matcher; cut the text at a match."""
        if self.matcher is None:
            return None
        self.stop_state, hit = self.matcher.feed(self.stop_state, new)
        if hit is None:
            return None
        end, stop = hit
        cut = len(self.text) - len(new) + end  # just after the stop string
        self.text = self.text[:cut] if self.include_stop else self.text[:cut - len(stop)]
        self.stop_reason = stop
        return stop

    def stream_text(self, finished: bool) -> str:
        """Text safe to show now: all of it when finished, else minus a possible stop prefix."""
        if finished or self.matcher is None or self.stop_reason is not None:
            return self.text
        hold = self.matcher.depth(self.stop_state)
        return self.text[: len(self.text) - hold] if hold else self.text
