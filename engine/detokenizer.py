"""Incremental detokenization that never emits broken UTF-8, and stop strings.

Each new token decodes a short window (a few tokens of context before the unread ones);
text is released only once it no longer ends in U+FFFD, i.e. once a multi-byte character
split across tokens is complete. Stop strings are searched across token boundaries, cut
from the text, and while a request runs the tail that could still grow into a stop
string is held back from ``stream_text``.
"""
from __future__ import annotations

from .request import Request

_CONTEXT_TOKENS = 5  # tokens decoded before the unread ones, for correct leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer, req: Request) -> None:
        self.tokenizer = tokenizer
        params = req.sampling_params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.token_ids = list(req.prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - _CONTEXT_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append one token's text; returns the stop string if one now matched (text cut)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return self._check_stop(old_len)
        return None

    def _check_stop(self, old_len: int) -> str | None:
        if not self.stop:
            return None
        # A match may start up to max_stop_len - 1 characters before the new text.
        start = max(old_len - self.max_stop_len + 1, 0)
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def stream_text(self, finished: bool) -> str:
        """Text safe to show now: all of it when finished, else minus a possible stop prefix."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self.text[: len(self.text) - hold] if hold else self.text
